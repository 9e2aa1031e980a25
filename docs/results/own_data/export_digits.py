# Write scikit-learn's bundled handwritten digits (UCI optical recognition, 1797 images of 8x8) as
# an image folder: digits/<class>/<i>.png
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
d = load_digits()
for i, (img, y) in enumerate(zip(d.images, d.target)):
    folder = Path("digits") / names[y]
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255 / 16).astype(np.uint8)).save(folder / f"{i}.png")
print(len(d.target), "images")
