"""Train this experiment: `python train.py [--resume] [--cfg FILE] [key=value ...]`, or under torchrun."""
from config import C
from furnace.engine import main

if __name__ == "__main__":
    main(C)
