"""Static configuration tables: accelerator facts (`configs.hardware`) and mesh presets (`configs.meshes`)."""
