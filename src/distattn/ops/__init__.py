"""Pure tensor functions: no nn.Module, no torch.distributed, one rank's tensors."""
