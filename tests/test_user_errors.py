"""Failures a user can cause end in one `doco: error:` line naming the file, with exit status 2, not a traceback."""

import re
import shutil

import pytest

from doco_lib.app import cli
from doco_lib.models import toy_weights_dir

NOT_UTF8 = b"a photo of a \xff pentagon\n"


def corrupt_unet(tmp_path):
    unet = tmp_path / "unet"
    shutil.copytree(toy_weights_dir() / "pipeline" / "unet", unet)
    weights = unet / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a full disk or an interrupted copy
    return ["sample", "--model", "toy", "--unet", str(unet), "--prompt", "a star", "--out", str(tmp_path / "o")], \
        "could not be loaded"


def prompt_file_not_utf8(tmp_path):
    (tmp_path / "prompts.txt").write_bytes(NOT_UTF8)
    (tmp_path / "p.yaml").write_text(f"anchor_prompts_file: {tmp_path / 'prompts.txt'}\n")
    return ["train", "--params", str(tmp_path / "p.yaml")], r"prompts.txt: not UTF-8 text \(byte 13 is 0xff\)"


def params_file_not_utf8(tmp_path):
    (tmp_path / "p.yaml").write_bytes(b"run_name: caf\xe9\n")
    return ["train", "--params", str(tmp_path / "p.yaml")], "p.yaml: not UTF-8 text"


def i2p_csv_not_utf8(tmp_path):
    (tmp_path / "i2p.csv").write_bytes(b"prompt,evaluation_seed,evaluation_guidance\n" + NOT_UTF8.strip() + b",1,7.5\n")
    (tmp_path / "p.yaml").write_text(f"i2p_csv: {tmp_path / 'i2p.csv'}\noutput_root: {tmp_path}\n")
    return ["eval", "--params", str(tmp_path / "p.yaml")], "i2p_csv: .*i2p.csv: not UTF-8 text"


@pytest.mark.parametrize("case", [corrupt_unet, prompt_file_not_utf8, params_file_not_utf8, i2p_csv_not_utf8],
                         ids=lambda case: case.__name__)
def test_user_errors_end_in_one_line(case, tmp_path, capsys):
    argv, expected = case(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("doco: error: ") and re.search(expected, last), err
