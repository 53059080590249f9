"""`notsure repro <experiment>`: the paper's experiments at CPU scale, one module per experiment.

Each experiment writes `<name>.json` and `<name>.png` into docs/reproduction/ and rewrites its
own section of docs/reproduction.md (between `<!-- BEGIN repro:<name> -->` markers), so the
report always shows the numbers of the last run next to the paper's.
"""
