"""pinpoint.text: the normalisation helpers shared by data and judges."""
from pinpoint import judges, text
from pinpoint.text import fold, normalize_answer, normalize_apostrophes


def test_normalize_apostrophes():
    assert normalize_apostrophes("I don\u2019t \u201cthink\u201d \u2018so\u2019") == "I don't \"think\" 'so'"
    assert normalize_apostrophes("\uff21\u02bc") == "A'"  # NFKC folds the full-width letter


def test_fold():
    assert fold("  I Don\u2019t\tthink   THAT's right. ") == "i don't think that's right."
    assert fold("") == ""


def test_normalize_answer():
    assert normalize_answer("The Peter\u2019s  Principle!") == ["peters", "principle"]
    assert normalize_answer("2 4 hours") == ["24", "hours"]
    assert normalize_answer("route 6 a") == ["route", "6"]  # digits join digits only
    assert normalize_answer("A, an, the.") == []


def test_judges_use_the_one_copy():
    assert judges.normalize_answer is text.normalize_answer
    assert judges.normalize_apostrophes is text.normalize_apostrophes
