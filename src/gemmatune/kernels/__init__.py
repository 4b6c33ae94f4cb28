"""Our own computations in plain torch, where a library's would cost more on the hardware users have: the packed
attention of a batch of examples at once (attention.py), and the LoRA branch with its dropout in one autograd
function (lora.py). Each is checked against the library computation it replaces (tests/test_packing.py,
tests/test_fused_lora.py); nothing here knows a model family, a config or a run."""
