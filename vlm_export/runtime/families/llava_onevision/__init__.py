"""Host-side (numpy + Pillow) runtime pieces of LLaVA-OneVision: anyres crops and the packing of crop features."""
