"""Dataset writers: the built-in digits, CIFAR archives, and the folder protocol they share (no VISSL import)."""
