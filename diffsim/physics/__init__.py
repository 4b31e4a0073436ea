"""The physics layer, in torch: the one source of truth for materials (torch Modules with
psi), elasticity, the IPC barrier, the ground, the velocity clamp and stable-step estimates."""
