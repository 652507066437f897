"""Training a run: `state` (setup and restore), `loop` (epochs, validation, the finish), `selection` (the best
epoch and its notes), `rundir` (the run folder and its log), `run` (strategies and `train`), `probe` (the
frozen-feature heads)."""
