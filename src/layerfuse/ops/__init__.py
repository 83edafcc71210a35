"""Parameter-free math and kernels: deformable sampling and attention dispatch."""

__all__: list[str] = []
