"""Math answer extraction and equivalence: hand-labelled pairs, truncation, bad input."""

from __future__ import annotations

import threading

import pytest

from tracerl.rewards.math_answers import extract_answer, extract_boxed, score_math, verify_answer

# (prediction, ground truth, equivalent?)
PAIRS = [
    # integers, signs, thousands separators
    ("42", "42", True), ("42", "43", False), ("-7", "-7", True), ("-7", "7", False),
    ("1,000", "1000", True), ("1000", "100", False), ("+5", "5", True), ("007", "7", True),
    # decimals and fractions
    ("0.5", "\\frac{1}{2}", True), ("\\frac{1}{2}", "0.5", True), ("1/2", "2/4", True),
    ("\\dfrac{3}{4}", "0.75", True), ("\\tfrac{3}{4}", "\\frac{3}{4}", True),
    ("\\frac{1}{3}", "0.333", False), ("\\frac{2}{3}", "\\frac{3}{2}", False),
    ("-\\frac{1}{2}", "-0.5", True), ("2.50", "2.5", True), ("2.5", "2.05", False),
    # radicals and expressions
    ("2\\sqrt{2}", "\\sqrt{8}", True), ("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}", True),
    ("\\sqrt{3}", "\\sqrt{2}", False), ("3\\sqrt{3}", "\\sqrt{27}", True),
    ("\\frac{\\pi}{2}", "\\pi/2", True), ("\\pi", "3.14", False),
    ("(x+1)^2", "x^2+2x+1", True), ("x^2+1", "x^2+2x+1", False), ("2x", "x+x", True),
    ("x^2-1", "(x-1)(x+1)", True), ("x^2-1", "(x-1)^2", False),
    # intervals and sets
    ("[1,2)", "[1,2)", True), ("(1,2]", "[1,2)", False), ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("(-\\infty, 3)", "(-\\infty,3]", False), ("[0,1]\\cup[2,3]", "[0,1]\\cup[2,3]", True),
    ("\\{1,2,3\\}", "\\{3,2,1\\}", True), ("\\{1,2\\}", "\\{1,2,3\\}", False),
    ("3, 4", "4, 3", True),
    # units, degrees, currency
    ("5 \\text{ cm}", "5", True), ("5\\text{ meters}", "6", False), ("90^\\circ", "90", True),
    ("90^{\\circ}", "\\frac{\\pi}{2}", False), ("\\$5", "5", True), ("\\$5.00", "5", True),
    # percentages
    ("10\\%", "10", True), ("25\\%", "25", True), ("25\\%", "20", False), ("50%", "50", True),
    # matrices and vectors
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    ("\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", False),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("\\begin{pmatrix}0.5&1\\end{pmatrix}", "\\begin{pmatrix}\\frac{1}{2}&1\\end{pmatrix}", True),
    # equations and text answers
    ("x=3", "3", True), ("x=4", "3", False), ("y = 2x+1", "y=2x+1", True),
    ("\\text{Monday}", "Monday", True), ("Tuesday", "Monday", False), ("\\text{(B)}", "B", True),
    ("B", "C", False), ("yes", "no", False), ("\\textbf{yes}", "yes", True),
    # infinities and large numbers
    ("\\infty", "\\infty", True), ("-\\infty", "\\infty", False),
    ("106475279601", "106475279601", True), ("106475279601", "106475279600", False),
    ("10^{3}", "1000", True), ("2^{10}", "1000", False), ("10\\%", "0.1", False),
    ("0", "-0", True), ("0", "", False), ("\\frac{7}{2}", "3", False),
]

# issue 14: normalisation must not manufacture equality (decimal points, digit spacing,
# false equations), and must keep the true cases it exists for
NO_FALSE_POSITIVES = [
    ("1.5x", "15x", False), ("15x", "1.5x", False), ("\\text{2.5 cm}", "\\text{25 cm}", False),
    ("2.5 \\text{ cm}", "25 \\text{ cm}", False), ("1 5", "15", False), ("[1.5, 2]", "[15, 2]", False),
    ("\\begin{pmatrix}1.5&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}15&2\\\\3&4\\end{pmatrix}", False),
    ("5 = 4", "4", False), ("5=4", "4", False), ("4 = 5", "4", False), ("x = 5 = 4", "4", False),
    # true ones
    ("1.5x", "\\frac{3}{2}x", True), ("\\text{2.5 cm}", "\\text{2.5 cm}", True),
    ("2.5 \\text{ cm}", "2.5", True), ("\\$1.50", "1.5", True), ("2+2 = 4", "4", True),
    ("x = 4", "4", True), ("x = \\frac{1}{2}", "0.5", True), ("[1.5, 2]", "[\\frac{3}{2}, 2]", True),
    ("\\begin{pmatrix}1.5&2\\end{pmatrix}", "\\begin{pmatrix}\\frac{3}{2}&2\\end{pmatrix}", True),
    ("1,000.5", "1000.5", True), ("\\text{Monday.}", "Monday", True),
]


@pytest.mark.parametrize("pred,gold,eq", NO_FALSE_POSITIVES)
def test_no_false_positives(pred, gold, eq):
    assert verify_answer(pred, gold, timeout_s=5) is eq


def test_last_box_decides():
    assert score_math("try \\boxed{15x}, no: \\boxed{1.5x}", "1.5x").correct
    assert not score_math("try \\boxed{1.5x}, no: \\boxed{15x}", "1.5x").correct


def test_at_least_60_pairs():
    assert len(PAIRS) >= 60
    assert sum(1 for *_, eq in PAIRS if not eq) >= 25


@pytest.mark.parametrize("pred,gold,eq", PAIRS)
def test_pairs(pred, gold, eq):
    assert verify_answer(pred, gold, timeout_s=5) is eq


def test_verify_from_worker_thread_uses_timeout_process():
    out = []
    t = threading.Thread(target=lambda: out.append(
        (verify_answer("(x+1)^2", "x^2+2x+1"), verify_answer("x^2", "x^2+2x+1"))))
    t.start()
    t.join(60)
    assert out == [(True, False)]


@pytest.mark.parametrize("text,want", [
    ("so \\boxed{42}.", "42"),
    ("first \\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("\\boxed{\\begin{pmatrix}1&2\\end{pmatrix}}", "\\begin{pmatrix}1&2\\end{pmatrix}"),
    ("nested \\boxed{\\sqrt{x^{2}+1}} ok", "\\sqrt{x^{2}+1}"),
    ("\\fbox{7}", "7"),
    ("\\boxed 5.", "5"),
    ("escaped brace \\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("good \\boxed{3} then unclosed \\boxed{4", "3"),
    ("GSM8K style\n#### 1,234", "1,234"),
    ("The final answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("Answer: 12", "12"),
    ("no answer here", None),
    ("", None),
])
def test_extraction(text, want):
    assert extract_answer(text) == want


def test_extract_boxed_rejects_non_text():
    assert extract_boxed(None) is None  # type: ignore[arg-type]
    assert extract_boxed(b"\\boxed{1}") is None  # type: ignore[arg-type]


def test_truncated_response_is_wrong():
    s = score_math("2+2=4 \\boxed{4}", "4", truncated=True)
    assert (s.correct, s.reason) == (False, "overlong")
    assert score_math("2+2=4 \\boxed{4}", "4", truncated=True, overlong_is_wrong=False).correct


@pytest.mark.parametrize("resp", [b"\xff\xfe\\boxed{4}", b"\x80\x81", "", "   ", None, 17,
                                  "\\boxed{" * 5000, "\ud800\\boxed{4}", "9" * 50000])
def test_bad_model_output_never_raises(resp):
    s = score_math(resp, "4")
    assert isinstance(s.correct, bool)


def test_non_utf8_bytes_are_decoded_with_replacement():
    assert score_math(b"\xff junk \\boxed{4}", "4").correct


def test_missing_reference_is_reported():
    assert score_math("\\boxed{4}", None).reason == "no_reference"
    assert score_math("\\boxed{4}", "  ").reason == "no_reference"
