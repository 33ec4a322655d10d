"""Every device kernel (Triton, and the `torch.compile` fusions) with its tile tables, as plain
functions over tensors: no modules, no parallelism, no batch bookkeeping. Imports only `core`."""
