"""Research harness for robust losses under label noise (uses the drainage_fast library).

A library of modules and subpackages, and thin commands that only consume it (docs/layers.md):

    config.load_config(name_or_path, overrides) -> Config      presets in train/configs/*.json
    data.build_data(cfg) -> NoisyDataset                        tensors, noisy + clean labels, tuning split
    noise.apply_noise(...) -> (noisy labels, NoiseRecord)
    models.build_model(name, num_outputs, pretrained)           models/resnet.py: torchvision's names
    losses.build_loss(name, num_classes, **params), losses.num_outputs, losses.l1_penalty
    experiment.run_experiment(cfg, run_dir) -> RunResult        one run end to end, the run folder
    experiment.check_plan(cfgs)                                 a multi-run command's checks
    jobs.Job                                                    its run folders: reused, continued, claimed
    run_dirs.claim_run_dir, run_dirs.UserError                  one folder per run; a user's mistake
    run_dirs.Interrupted, run_dirs.lock_run_dir                 Ctrl-C's one line; a folder being trained
    arguments.Extend                                            a repeated flag adds up
    grid.parse_noise / parse_grid / grid_points / config_for   the multi-run commands' shared syntax,
    grid.best_points / reproducing_command                     the best grid point, the reproducing command
    trainer.Trainer, trainer.class_predictions                  (p_d, precision@k: drainage_fast.openset)
    openset/                                                    open-set splits, data and runs
    cleaning.rank_run(run_dir, ks)                              training samples ranked by a suspicion score
    report/                                                     tables, figures, report.pyplot()
    scale/                                                      the large-scale loop (train.imagenet_scale)
    checkpoint.atomic_save / load_checkpoint / read_checkpoint / capture_rng_state / restore_rng_state
    cli.COMMANDS, cli.shared_parser                             a new `python -m train <cmd>` is one line and
                                                                one module in commands/
"""
