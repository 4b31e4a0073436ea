"""What users touch: scene scripts, fields for colouring, rendering, the viewer, progress
bars and the command line (apps/cli, one file per command)."""
