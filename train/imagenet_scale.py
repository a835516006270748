"""`python -m train.imagenet_scale`: the documented command of the large-scale loop (mini-WebVision with
ILSVRC12 val, Clothing1M; one GPU, many GPUs under torchrun, or a CPU). The command itself lives beside
its package, in train/scale/__main__.py (so `python -m train.scale` runs it too); its flags:
`python -m train.imagenet_scale -h`.

    python -m train.imagenet_scale                      # smoke job: generated WebVision tree, runs on a CPU
    torchrun --nproc_per_node 8 -m train.imagenet_scale --config clothing1m_drainage \\
        --data_root /data/clothing1m --balanced_samples 64000
"""

import sys

from train.scale.__main__ import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
