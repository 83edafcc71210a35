"""Layer taps: pull chosen hidden states out of timm, Hugging Face and open_clip ViTs."""

__all__: list[str] = []
