"""Model definitions shared by training and inference (``wan_inpaint``: the 36-channel Wan2.1 inpainter)."""
