"""`python -m benchmarks` (or `make bench`): step-time benchmarks, written to benchmarks/results/."""

from benchmarks.step_time import main

if __name__ == "__main__":
    main()
