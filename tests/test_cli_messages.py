"""The CLI's half of an error message: the flag that fixes it, worded from the library's Remedy."""

import convert
from pipeline.core.errors import OutputExistsError, Remedy


def test_the_cli_words_every_remedy():
    assert set(convert.REMEDY_FLAGS) == {r.value for r in Remedy}


def test_a_message_gets_its_flag_from_the_cli():
    assert convert.describe(OutputExistsError("output exists: m.tflite", remedy=Remedy.FORCE)) == (
        "output exists: m.tflite; pass --force to overwrite, or --out to choose another")
    assert convert.describe(OutputExistsError("learning rate must be positive", setting="lr")) == (
        "learning rate must be positive (--lr)")
    assert str(OutputExistsError("output exists: m.tflite", remedy=Remedy.FORCE)) == "output exists: m.tflite"
