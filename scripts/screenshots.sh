#!/usr/bin/env bash
# Regenerates the pictures in docs/images with the render command (run after a change to
# rendering or to the scenes; needs headless EGL, see scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DIFFSIM=${DIFFSIM:-.venv/bin/diffsim}
$DIFFSIM render scenes/cantilever.py --steps 300 --color von_mises --size 800x500 \
    --out docs/images/cantilever_von_mises.png
$DIFFSIM render scenes/cube_drop.py --steps 215 --color speed --size 800x500 \
    --out docs/images/cube_drop_speed.png
$DIFFSIM render scenes/sphere_bounce.py --steps 262 --color speed --size 800x500 \
    --out docs/images/sphere_bounce_speed.png
$DIFFSIM run scenes/cube_drop.py --steps 700 --size 320x200 --fps 20 \
    --out docs/images/cube_drop.gif
