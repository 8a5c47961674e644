"""Importing reference checkpoints: safe file readers and the torchvision / detectron2 key mappings."""
