"""The foundation layer: config, recipes, records, samplers, runtime, losses, distributed helpers,
the trainer kit, the merging optimizer and weight sync. Imports nothing from the layers above."""
