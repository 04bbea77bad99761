"""Training the networks with PyTorch Lightning: `ImageClassifier` (`module`, the paper's recipe; `recipe`,
its schedule and checks), what every run adds to the Trainer (`callbacks`, `results`, `throughput`), a run's
directory (`rundir`) and config files (`config`), W&B modes and ids (`tracking`) and the CPU allocator tuning
(`allocator`)."""
