"""LoRA recovery of a pruned model (``minillm recover``), one concern per module: ``config``
(the run's options), ``data`` (training text and batches), ``teacher`` (the dense teacher and
its kept top-k), ``train`` (adapters, the loop, checkpoints, merging), ``loss`` (the fused
CE + KL loss)."""
