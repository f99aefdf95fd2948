"""Host-side (numpy) runtime pieces of Qwen3-VL and Qwen3-VL-MoE, which share vision inputs and rope index."""
