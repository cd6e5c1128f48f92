#!/bin/sh
# Prints the absolute paths of a photo list (train_photos.txt or validation_photos.txt) on this
# machine, extracting the jigzo photos first. Needs:
#   apt-get install lomiri-wallpapers lomiri-wallpapers-20.04 plasma-workspace-wallpapers mate-backgrounds jigzo-data
# Usage: sh configs/quality/photos.sh configs/quality/train_photos.txt
set -e
list=$1
[ -f runs/photos/jigzo/windmill.png ] || python configs/quality/extract_jigzo.py runs/photos/jigzo > /dev/null
skimage_data=$(python -c "import os, skimage; print(os.path.join(os.path.dirname(skimage.__file__), 'data'))")
sed "s#^SKIMAGE_DATA/#$skimage_data/#; s#^runs/#$(pwd)/runs/#" "$list"
