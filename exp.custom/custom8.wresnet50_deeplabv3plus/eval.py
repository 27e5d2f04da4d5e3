"""Evaluate this experiment's checkpoints: `python eval.py -e 30` (or -e 15-33, -e 20-, -p FILE)."""
from config import C
from furnace.evaluate import main

if __name__ == "__main__":
    main(C)
