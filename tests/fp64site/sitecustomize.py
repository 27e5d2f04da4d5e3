"""Test instrumentation, not production code: with this folder on PYTHONPATH and TRAINKIT_FP64=1, every
training process (a script named train.py: plain or a torchrun worker) trains in float64 (tests/trainkit.py
float64_everywhere), so that the real command line (script.sh -> torchrun -> train.py) can be run without
float32 rounding. Evaluation (eval.py) stays float32. Python imports `sitecustomize` at start-up from the
first folder of sys.path that holds one."""
import os
import sys

if os.environ.get("TRAINKIT_FP64") == "1" and os.path.basename(sys.argv[0] if sys.argv else "") == "train.py":
    import atexit
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for trainkit
    import trainkit
    _FLOAT64 = trainkit.float64_everywhere()  # kept referenced: a collected generator would run its `finally`
    _FLOAT64.__enter__()  # for the whole life of the process
    atexit.register(_FLOAT64.__exit__, None, None, None)  # restored before the interpreter tears torch down
