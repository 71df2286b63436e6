"""Benchmark scoring as lm-evaluation-harness 0.4.13 does it by default, quirks included.

Our numbers are read next to published harness numbers, so each benchmark is scored the way the harness's task of
the same name scores it: the same answer extraction (its regex filters and their fallbacks), the same normalization,
the same metric. Where the harness is surprising (a regex that drops the last character, strings compared without
numeric parsing) we keep the surprise on purpose and say so where it happens; tests/test_scoring.py runs the
harness's own code on the same outputs.

Written here from the harness's behaviour rather than imported from it, so that evaluation does not depend on lm-eval
or its task files. One deliberate difference: MATH is scored by string match only (see `math_score`).
"""

import re
import string

import numpy as np

INVALID = "[invalid]"  # what the harness's regex filter returns when its pattern finds nothing
INVALID_MATH_ANSWER = "[invalidanswer]"  # minerva_math's answer when the generation has no final-answer sentence

_ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, reference: str, *, ignore_case: bool = False, ignore_punctuation: bool = False,
                regexes_to_ignore=()) -> float:
    """The harness's `exact_match` metric on one pair (Hugging Face `evaluate`'s semantics): every match of each
    regex in `regexes_to_ignore` is deleted from both strings, in order; then, if asked, both are lowercased and
    lose their ASCII punctuation; 1.0 if they are then equal.

    The harness holds the strings in numpy arrays, which drop trailing NUL characters and cut a string whose
    lowercase is longer (as "İ" is) to its original length; plain Python strings do neither.
    """
    def canonical(text: str) -> str:
        for pattern in regexes_to_ignore:
            text = re.sub(pattern, "", text)
        if ignore_case:
            text = text.lower()
        if ignore_punctuation:
            text = text.translate(_ASCII_PUNCTUATION)
        return text

    return float(canonical(prediction) == canonical(reference))


def regex_answer(generation: str, pattern: str, match_index: int = 0) -> str:
    """The harness's `regex` filter: the `match_index`-th match of `pattern` in the generation (re.findall's
    order), its first non-empty group when the pattern has several, stripped; INVALID when nothing matches."""
    matches = re.findall(pattern, generation)
    if not matches:
        return INVALID
    match = matches[match_index]
    if isinstance(match, tuple):
        match = next((group for group in match if group), INVALID)
    return match.strip()


# gsm8k_cot. The strict pattern's last "." is unescaped, so it takes any character, a digit included.
GSM8K_STRICT_PATTERN = r"The answer is (\-?[0-9\.\,]+)."
GSM8K_FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
GSM8K_IGNORED = (",", r"\$", "(?s).*#### ", r"\.$")


def gsm8k_strict_answer(generation: str) -> str:
    """gsm8k_cot's `strict-match` answer: the number after the first "The answer is ", which must be followed by one
    more character. Quirk kept: that character may be the number's own last digit, so "The answer is 72" at the very
    end gives "7" and "The answer is 7.2" gives "7."."""
    return regex_answer(generation, GSM8K_STRICT_PATTERN)


def gsm8k_flexible_answer(generation: str) -> str:
    """gsm8k_cot's `flexible-extract` answer: the last run of two or more of digits, "$", "." and "," (it need not
    hold a digit: "..." is one), or else of a single digit, each with an optional "-" in front; "5." and "$18" come
    with their punctuation."""
    return regex_answer(generation, GSM8K_FLEXIBLE_PATTERN, match_index=-1)


def gsm8k_score(generation: str, target: str) -> dict[str, float]:
    """gsm8k_cot's two exact-match scores. `target` is the gold answer as the harness renders it (the text after
    "####", stripped). Answers compare as strings, case ignored, after deleting ",", "$", anything up to "#### " and
    one final "."; so "3.50" does not match "3.5"."""
    def score(answer: str) -> float:
        return exact_match(answer, target, ignore_case=True, regexes_to_ignore=GSM8K_IGNORED)

    return {"exact_match,strict-match": score(gsm8k_strict_answer(generation)),
            "exact_match,flexible-extract": score(gsm8k_flexible_answer(generation))}


# bbh_cot_fewshot_*: everything after "the answer is " on its line, up to but without the line's last character.
BBH_ANSWER_PATTERN = r"(?<=the answer is )(.*)(?=.)"


def bbh_answer(generation: str) -> str:
    """bbh_cot_fewshot's `get-answer`: what follows the first lowercase "the answer is " on that line, less the line's
    last character (meant to be the final period), stripped. Quirk kept: without the period the answer loses its last
    character ("the answer is False" gives "Fals")."""
    return regex_answer(generation, BBH_ANSWER_PATTERN)


def bbh_score(generation: str, target: str) -> dict[str, float]:
    """bbh_cot_fewshot's exact match: case- and punctuation-sensitive ("(b)" is not "(B)")."""
    return {"exact_match": exact_match(bbh_answer(generation), target)}


def triviaqa_score(generation: str, aliases) -> dict[str, float]:
    """triviaqa's exact match: the generation stripped of surrounding whitespace (its `remove_whitespace` filter
    strips both ends), matched against each alias with case and ASCII punctuation ignored; 1.0 if any matches.
    Articles are not removed: "Beatles" does not match "The Beatles"."""
    answer = generation.strip()
    return {"exact_match": max((exact_match(answer, alias, ignore_case=True, ignore_punctuation=True)
                                for alias in aliases), default=0.0)}


def multiple_choice_score(loglikelihoods, gold: int, continuations, *, target_delimiter: str = " ") -> dict[str, float]:
    """The harness's `multiple_choice` accuracy: acc is 1.0 if the choice with the highest log-likelihood is `gold`,
    acc_norm the same after dividing each log-likelihood by its choice's length in characters (not bytes, not
    tokens). Ties go to the first choice (numpy's argmax).

    `continuations` are the strings that were scored after the context, `target_delimiter + choice` as the harness
    builds them (" A", " Paris"); the harness's length is the choice's alone, without the delimiter.
    """
    if not all(continuation.startswith(target_delimiter) for continuation in continuations):
        raise ValueError(f"every continuation must start with the target delimiter {target_delimiter!r}")
    loglikelihoods = np.asarray(loglikelihoods, dtype=np.float64)
    choice_lengths = np.array([len(continuation) - len(target_delimiter) for continuation in continuations], np.float64)
    return {"acc": float(np.argmax(loglikelihoods) == gold),
            "acc_norm": float(np.argmax(loglikelihoods / choice_lengths) == gold)}


# DROP: the official bag-of-words EM and F1, as the harness's drop/utils.py computes them.
_DROP_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_number(text: str) -> bool:
    """DROP's test for a number is whatever float() accepts: "1e3", "nan" and "1_000" included."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _drop_normalize_token(token: str) -> str:
    token = token.lower()
    if not _is_number(token):
        token = token.translate(_ASCII_PUNCTUATION)
    if _is_number(token):
        token = str(float(token))
    return " ".join(_DROP_ARTICLES.sub(" ", token).split())


def drop_normalize(span: str) -> str:
    """A span as DROP compares it: split at spaces and hyphens, each piece lowercased, stripped of punctuation
    unless it is a number, numbers written as float() prints them ("5" and "5.00" are "5.0", "$1,000" is
    "1000.0"; "five" stays a word), articles removed, empty pieces dropped."""
    tokens = (_drop_normalize_token(token) for token in re.split("[ -]", span))
    return " ".join(token for token in tokens if token)


def _numbers_agree(predicted_bag: set[str], gold_bag: set[str]) -> bool:
    """A gold span with numbers only scores against a prediction that shares one of them."""
    gold_numbers = {word for word in gold_bag if _is_number(word)}
    return not gold_numbers or bool(gold_numbers & {word for word in predicted_bag if _is_number(word)})


def _bag_f1(predicted_bag: set[str], gold_bag: set[str]) -> float:
    if not _numbers_agree(predicted_bag, gold_bag):
        return 0.0
    overlap = len(predicted_bag & gold_bag)
    precision = overlap / float(len(predicted_bag)) if predicted_bag else 1.0
    recall = overlap / float(len(gold_bag)) if gold_bag else 1.0
    if precision == 0.0 and recall == 0.0:
        return 0.0
    return (2 * precision * recall) / (precision + recall)


def _drop_answer_scores(predicted: str, gold_spans) -> tuple[float, float]:
    """EM and F1 of one normalized predicted span against one gold answer (a list of spans).

    DROP aligns predicted and gold spans one to one (the harness with scipy's linear_sum_assignment) and averages
    the aligned F1s over the larger of the two counts. With one predicted span the best alignment pairs it with its
    best gold span, and the other gold spans count 0: a two-span gold answer scores at most 0.5.
    """
    gold = [drop_normalize(span) for span in gold_spans]
    exact = float(len(gold) == 1 and gold[0] == predicted)
    best_f1 = max(_bag_f1(set(predicted.split()), set(span.split())) for span in gold)
    # numpy's rounding, as the harness's: it rounds 0.075 to 0.08 where Python's round() gives 0.07.
    return exact, float(np.round(best_f1 / len(gold), 2))


def drop_score(prediction: str, gold_answers) -> dict[str, float]:
    """The harness's `drop` EM and F1: the prediction is one span, each gold answer a list of spans (the task's
    `answers` field); the best score over the gold answers, F1 rounded to 2 decimals. Gold answers whose first span
    is blank are skipped."""
    predicted = drop_normalize(prediction)
    em = f1 = 0.0
    for gold_spans in gold_answers:
        if gold_spans[0].strip():
            exact, f1_score = _drop_answer_scores(predicted, gold_spans)
            em, f1 = max(em, exact), max(f1, f1_score)
    return {"em": em, "f1": f1}


# MATH (minerva_math). The harness's `.` after the answer is unescaped: any character ends the answer.
MATH_ANSWER_PATTERN = r"Final Answer: The final answer is(.*?). I hope it is correct."
MATH_END = "I hope it is correct."


def math_answer(generation: str) -> str:
    """minerva_math's answer: the text between the first "Final Answer: The final answer is" and the next ". I hope
    it is correct." on the same line, stripped; INVALID_MATH_ANSWER without one. Quirks kept: the pattern's periods
    match any character, and the harness appends "I hope it is correct." to the generation before searching, so
    "...is 5. " at the very end still gives "5" (but "...is 5." does not)."""
    match = re.search(MATH_ANSWER_PATTERN, generation + MATH_END)
    return match.group(1).strip() if match else INVALID_MATH_ANSWER


# Minerva's normalization (Lewkowycz et al. 2022, appendix D) as lm-eval 0.4.13 revised it: unit words go only as
# whole words or outside LaTeX command names (so "\left" keeps its "ft"), and commas go only from thousands groups.
MATH_SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)
# Removed in this order: unit words (the alphabetic entries) outside LaTeX command names, the rest wherever they are.
MATH_REMOVED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
    "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3",
    "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots",
)
MATH_UNIT_WORDS = tuple(expression for expression in MATH_REMOVED if expression.isalpha())


def _remove_word_outside_commands(text: str, word: str) -> str:
    # A LaTeX command name is matched first and kept whole, so the word is only removed from the text between them.
    return re.sub(rf"(\\[a-zA-Z]+)|{word}", lambda match: match.group(1) or "", text)


def _unwrap_latex(text: str) -> str:
    """Keep what sits in the first $...$ of each line, then the insides of \\text{}, \\textbf{}, \\overline{} and the
    outermost \\boxed{}; brace shorthand spelled out (\\frac12 -> \\frac{1}{2}, \\sqrt2 -> \\sqrt{2},
    \\sqrt[3]8 -> \\sqrt[3]{8}); every $ dropped."""
    text = re.sub(r".*?\$(.*?)\$.*", r"$\1$", text)
    for command in ("text", "textbf", "overline"):
        text = re.sub(rf"\\{command}\{{(.*?)\}}", r"\1", text)
    text = re.sub(r"\\boxed\{(.*)\}", r"\1", text)
    text = re.sub(r"frac([^{])(.)", r"frac{\1}{\2}", text)
    text = re.sub(r"sqrt(\[[^\]]*\])(\w)", r"sqrt\1{\2}", text)
    text = re.sub(r"sqrt(?!\[)([^{])", r"sqrt{\1}", text)
    return text.replace("$", "")


def normalize_math_answer(answer: str) -> str:
    """minerva_math's normalize_final_answer: what follows the last "=", without unit words (MATH_REMOVED), spaces,
    "a "/"an ", escaped dollars and LaTeX spacing, with LaTeX wrappers unwrapped and thousands separators dropped
    ("1,000" -> "1000", but "0,1" stays). No other rewriting: "\\dfrac{1}{2}" and "0.5" stay as they are."""
    answer = answer.split("=")[-1]
    # Unit words go first while spaces still delimit them, then again once the spaces are gone.
    for word in MATH_UNIT_WORDS:
        answer = re.sub(rf"(?<!\\)\b{word}\b", "", answer)
    for before, after in MATH_SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expression in MATH_REMOVED:
        if expression in MATH_UNIT_WORDS:
            answer = _remove_word_outside_commands(answer, expression)
        else:
            answer = answer.replace(expression, "")
    answer = _unwrap_latex(answer)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", answer):
        answer = answer.replace(",", "")
    return answer


def math_score(generation: str, answer: str) -> dict[str, float]:
    """minerva_math's exact match, string part only: 1.0 if the generation's answer and the gold answer (the content
    of the solution's last \\boxed{}) normalize to the same non-empty string.

    The harness also counts as correct any pair that sympy's LaTeX parser proves equal ("\\dfrac{1}{2}" and "0.5",
    "x+1" and "1+x"); we do not (it needs sympy and antlr4), so our MATH score is a lower bound on the harness's.
    """
    candidate = normalize_math_answer(math_answer(generation))
    return {"exact_match": float(bool(candidate) and candidate == normalize_math_answer(answer))}
