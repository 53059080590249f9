"""The attack tool: non-adaptive attacks of the paper, adaptive white-box attacks, clients."""
