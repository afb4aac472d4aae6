"""The VPP layer: one thin module per VPP feature, each building checked API requests."""
