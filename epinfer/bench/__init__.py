"""`epinfer bench`: decode / prefill speed on real model shapes with random weights, in one process
(`single`) or on spawned DP × TP ranks (`parallel`), with a per-part step breakdown (`profiling`)."""
