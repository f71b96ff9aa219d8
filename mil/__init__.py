"""Attention-MIL aggregators, training and clinical evaluation over bags of patch features."""
