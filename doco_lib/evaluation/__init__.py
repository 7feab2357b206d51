"""Evaluation as in the DoCo paper: CLIP score, CLIP accuracy, FID, related concepts, nudity."""
