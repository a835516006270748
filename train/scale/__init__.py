"""Large-scale training (mini-WebVision + ILSVRC12 val, Clothing1M): the command (__main__.py, run as
`python -m train.imagenet_scale`, see train/imagenet_scale.py) and the pieces behind it.

    __main__.py       the command: flags -> checks -> lists -> run folder -> training loop
    start.py          before the first step: --resume and its overrides, checks against the machine,
                      the run folder's claim, the log before the folder exists
    lists.py          the datasets' list formats -> ImageList (paths + labels); class-balanced draws
    validate.py       missing / corrupt files counted and dropped before training (sharded, cached by
                      file size and modification time)
    transforms.py     the augmentation recipe (constants + PIL/numpy transforms for the torch path)
    dali_pipeline.py  the same recipe as DALI pipelines (decode on "mixed" with a GPU, "cpu" without)
    torch_loader.py   the torch DataLoader path (no torchvision), globally planned batches
    data.py           builds lists, loaders and device-ready batches
    distributed.py    torchrun / DDP setup and collectives
    models.py         model building (+ a tiny test model), SyncBN, channels_last, DDP, compile
    loop.py           the training loop, evaluation, checkpoints
    smoke.py          generated JPEG trees in the real layouts (smoke job, tests, benchmark)
"""
