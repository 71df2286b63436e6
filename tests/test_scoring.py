"""mhc_jax/evals/scoring.py against lm-evaluation-harness 0.4.13's own code, on the same model outputs.

GSM8K, BBH, TriviaQA, HellaSwag and MMLU run as real harness tasks: built from the YAML files the harness ships,
with one in-memory document, through its filters and its process_results. DROP and MATH call the functions of the
harness's drop/utils.py and minerva_math/utils.py that those tasks use. A few cases also pin the documented quirks
to hand-computed values.
"""

from pathlib import Path

import datasets
import lm_eval
import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.tasks.drop import utils as harness_drop
from lm_eval.tasks.minerva_math import utils as harness_math

from mhc_jax.evals import scoring

HARNESS_TASKS = Path(lm_eval.__file__).parent / "tasks"
GSM8K_YAML = "gsm8k/gsm8k-cot.yaml"
BBH_YAML = "bbh/cot_fewshot/boolean_expressions.yaml"  # all 27 bbh_cot_fewshot tasks share its filter and metric
TRIVIAQA_YAML = "triviaqa/default.yaml"
HELLASWAG_YAML = "hellaswag/hellaswag.yaml"
MMLU_YAML = "mmlu/default/mmlu_abstract_algebra.yaml"
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")

datasets.disable_progress_bars()


def harness_task(yaml_path: str, doc: dict) -> ConfigurableTask:
    """The harness's task from its packaged YAML, with `doc` as the only document of every split it names."""
    config = load_yaml(HARNESS_TASKS / yaml_path)
    splits = {config.get(key) for key in SPLIT_KEYS} - {None}
    config["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {split: datasets.Dataset.from_list([doc]) for split in splits})
    return ConfigurableTask(config=config)


def harness_generation(yaml_path: str, doc: dict, generation: str) -> tuple[dict, dict]:
    """The answers the harness's filters extract from `generation` and its scores, keyed as in its results."""
    task = harness_task(yaml_path, doc)
    doc = task.eval_docs[0]
    answers, scores = {}, {}
    for pipeline in task._filters:
        instance = Instance("generate_until", doc, ("", {}), 0, resps=[generation])
        pipeline.apply([instance])
        answers[pipeline.name] = instance.filtered_resps[pipeline.name]
        for metric, value in task.process_results(doc, [answers[pipeline.name]]).items():
            scores[f"{metric},{pipeline.name}"] = float(value)
    return answers, scores


def harness_multiple_choice(yaml_path: str, doc: dict, loglikelihoods: list[float]) -> tuple[list[str], dict]:
    """The task's choices (after its document processing) and the harness's scores for these log-likelihoods."""
    task = harness_task(yaml_path, doc)
    doc = task.eval_docs[0]
    scores = task.process_results(doc, [(loglikelihood, False) for loglikelihood in loglikelihoods])
    return task.doc_to_choice(doc), {metric: float(value) for metric, value in scores.items()}


# --- GSM8K (gsm8k_cot) ---

GSM8K_CASES = [  # (generation, gold as the harness renders it)
    (" So she has 72 left. The answer is 72.", "72"),
    (" So she has 72 left. The answer is 72", "72"),
    (" The answer is 72.\n\n", "72"),
    (" The answer is 7.2", "7.2"),
    (" The answer is 7.2.", "7.2"),
    (" The answer is 1,234.", "1234"),
    (" The answer is 1234.", "1,234"),
    (" The answer is $18.", "18"),
    (" She pays $18 in all, so 18 dollars.", "18"),
    (" The answer is -5.", "-5"),
    (" It drops by 5, to -5 degrees.", "-5"),
    (" The answer is 3.50.", "3.5"),
    (" The answer is 3.5.", "3.5"),
    (" The answer is 0.5. Well, 1/2.", "0.5"),
    (" 3 + 5 = 8\n#### 8", "8"),
    ("#### 18", "18"),
    (" I do not know.", "5"),
    ("", "5"),
    (" the answer is 5.", "5"),
    (" The Answer is 5.", "5"),
    (" The answer is five.", "5"),
    (" The answer is 5. The answer is 6.", "6"),
    (" The answer is 5. The answer is 6.", "5"),
    (" He ran 3 miles and 4 miles. 3 + 4 = 7. The answer is 7.", "7"),
    (" 20 - 12 = 8 lollipops", "8"),
    (" Hmm, 8 or 9... I am not sure...", "8"),
    (" It went from 3 to -4", "-4"),
    (" The total is 1,000,000.", "1000000"),
    (" The answer is ,.", "5"),
    (" The answer is 12,5.", "125"),
    (" Answer: 5.", "5"),
    (" The answer is 2.0.", "2"),
    (" The answer is 100.\nQ:", "100"),
    (" The cost is $1,000.50, the answer is 1000.50.", "1000.50"),
    (" The answer is 42.\n", "42"),
    (" The answer is 10\n", "10"),
]


@pytest.mark.parametrize("generation,target", GSM8K_CASES)
def test_gsm8k_matches_harness(generation, target):
    answers, scores = harness_generation(GSM8K_YAML, {"question": "Q?", "answer": f"Work.\n#### {target}"}, generation)
    assert scoring.gsm8k_strict_answer(generation) == answers["strict-match"]
    assert scoring.gsm8k_flexible_answer(generation) == answers["flexible-extract"]
    assert scoring.gsm8k_score(generation, target) == scores


def test_gsm8k_quirks():
    assert scoring.gsm8k_strict_answer("The answer is 72") == "7"
    assert scoring.gsm8k_strict_answer("The answer is 7.2") == "7."
    assert scoring.gsm8k_strict_answer("no answer here") == scoring.INVALID
    assert scoring.gsm8k_score("The answer is 72", "72") == {"exact_match,strict-match": 0.0,
                                                             "exact_match,flexible-extract": 1.0}
    assert scoring.gsm8k_score("The answer is 3.50.", "3.5")["exact_match,strict-match"] == 0.0
    assert scoring.gsm8k_score("The answer is 1,234.", "1234")["exact_match,strict-match"] == 1.0


# --- BBH (bbh_cot_fewshot_*) ---

BBH_CASES = [  # (generation, target)
    ("not True is False. So the answer is False.", "False"),
    ("not True is False. So the answer is False", "False"),
    ("So the answer is False. ", "False"),
    ("So the answer is false.", "False"),
    ("So the answer is True.", "False"),
    ("So the answer is (B).", "(B)"),
    ("So the answer is (b).", "(B)"),
    ("So the answer is (B)", "(B)"),
    ("So the answer is B.", "(B)"),
    ("The answer is Yes.", "Yes"),
    ("So the answer is Yes.\n", "Yes"),
    ("So the answer is 24.", "24"),
    ("So the answer is 5", "5"),
    ("So the answer is .", ""),
    ("So the answer is  valid .", "valid"),
    ("So the answer is invalid.", "invalid"),
    ("So the answer is apple banana cherry.", "apple banana cherry"),
    ("So the answer is ] ] }.", "] ] }"),
    ("So the answer is No, because it rains.", "No"),
    ("First, the answer is A.\nThen the answer is B.", "A"),
    ("First, the answer is A.\nThen the answer is B.", "B"),
    ("I cannot tell.", "Yes"),
    ("", "Yes"),
    ("So the answer is  (C).", "(C)"),
]


@pytest.mark.parametrize("generation,target", BBH_CASES)
def test_bbh_matches_harness(generation, target):
    answers, scores = harness_generation(BBH_YAML, {"input": "not True =", "target": target}, generation)
    assert scoring.bbh_answer(generation) == answers["get-answer"]
    assert scoring.bbh_score(generation, target) == {"exact_match": scores["exact_match,get-answer"]}


def test_bbh_quirks():
    assert scoring.bbh_answer("So the answer is False") == "Fals"
    assert scoring.bbh_answer("So the answer is False.") == "False"
    assert scoring.bbh_score("So the answer is False", "False") == {"exact_match": 0.0}
    assert scoring.bbh_score("So the answer is (b).", "(B)") == {"exact_match": 0.0}
    assert scoring.bbh_answer("The answer is Yes.") == scoring.INVALID


# --- TriviaQA (triviaqa) ---

TRIVIAQA_CASES = [  # (generation, aliases)
    (" Paris", ["Paris"]),
    ("paris", ["Paris"]),
    ("  Paris  ", ["Paris", "Paris, France"]),
    (" PARIS\n", ["paris"]),
    (" Lyon", ["Paris", "Paris, France"]),
    (" The Beatles", ["Beatles", "The Beatles"]),
    (" Beatles", ["The Beatles"]),
    (" U.S.A.", ["USA", "United States"]),
    (" United States", ["USA", "United States of America"]),
    (" O'Neill", ["ONeill"]),
    (" Eugene O'Neill", ["Eugene O’Neill"]),
    (" rock-and-roll", ["Rock and roll"]),
    (" rock-and-roll", ["Rock and roll", "Rockandroll"]),
    (" Café", ["café"]),
    (" Washington D.C", ["Washington DC", "Washington, D.C."]),
    (" Mount  Everest", ["Mount Everest"]),
    (" Everest", ["Mount Everest", "Everest"]),
    ("", ["Paris"]),
    ("   ", ["Paris"]),
    (" Paris", [" Paris"]),
    (" 1984", ["1984", "Nineteen Eighty-Four"]),
    (" 3.14", ["314"]),
    ("\tTokyo", ["Tokyo"]),
]


@pytest.mark.parametrize("generation,aliases", TRIVIAQA_CASES)
def test_triviaqa_matches_harness(generation, aliases):
    _, scores = harness_generation(TRIVIAQA_YAML, {"question": "Capital?", "answer": {"aliases": aliases}}, generation)
    assert scoring.triviaqa_score(generation, aliases) == {"exact_match": scores["exact_match,remove_whitespace"]}


def test_triviaqa_by_hand():
    assert scoring.triviaqa_score("  u.s.a.\n", ["USA"]) == {"exact_match": 1.0}
    assert scoring.triviaqa_score(" Beatles", ["The Beatles"]) == {"exact_match": 0.0}


# --- Multiple choice (HellaSwag acc and acc_norm, MMLU acc) ---

HELLASWAG_CASES = [  # (log-likelihoods, gold, choices)
    ([-1.0, -2.0, -3.0, -4.0], 0, ["a", "b", "c", "d"]),
    ([-1.0, -1.0, -2.0, -3.0], 0, ["a", "b", "c", "d"]),
    ([-1.0, -1.0, -2.0, -3.0], 1, ["a", "b", "c", "d"]),
    ([-3.0, -2.0, -2.0, -2.0], 2, ["a", "b", "c", "d"]),
    ([-4.0, -6.0, -9.0, -9.0], 0, ["ab", "abcdef", "abc", "abc"]),
    ([-4.0, -6.0, -9.0, -9.0], 1, ["ab", "abcdef", "abc", "abc"]),
    ([-2.0, -4.0, -9.0, -9.0], 0, ["ab", "abcd", "abc", "abc"]),
    ([-2.0, -4.0, -9.0, -9.0], 1, ["ab", "abcd", "abc", "abc"]),
    ([-4.4, -5.0, -50.0, -50.0], 1, ["café", "abcde", "x", "y"]),
    ([-4.4, -5.0, -50.0, -50.0], 0, ["café", "abcde", "x", "y"]),
    ([-12.5, -30.1, -11.9, -25.0], 1, ["he walks in.", "he runs to the car and drives off.", "he sits.",
                                       "she opens the door and waves."]),
    ([-12.5, -30.1, -11.9, -25.0], 2, ["he walks in.", "he runs to the car and drives off.", "he sits.",
                                       "she opens the door and waves."]),
    ([float("-inf"), -1.0, -2.0, -3.0], 1, ["a", "b", "c", "d"]),
    ([-0.0, 0.0, -1.0, -1.0], 0, ["a", "b", "c", "d"]),
    ([-7.0, -7.0, -7.0, -7.0], 3, ["aa", "b", "cc", "d"]),
    ([-7.0, -7.0, -7.0, -7.0], 0, ["aa", "b", "cc", "d"]),
]


@pytest.mark.parametrize("loglikelihoods,gold,choices", HELLASWAG_CASES)
def test_hellaswag_multiple_choice_matches_harness(loglikelihoods, gold, choices):
    doc = {"ind": 0, "activity_label": "Cooking", "ctx_a": "A man stands.", "ctx_b": "then", "ctx": "",
           "endings": choices, "label": str(gold), "source_id": "", "split": "val", "split_type": "indomain"}
    harness_choices, scores = harness_multiple_choice(HELLASWAG_YAML, doc, loglikelihoods)
    assert harness_choices == choices  # the harness's cleaning left them as they are
    continuations = [" " + choice for choice in choices]
    assert scoring.multiple_choice_score(loglikelihoods, gold, continuations) == scores


@pytest.mark.parametrize("loglikelihoods,gold", [
    ([-1.0, -2.0, -3.0, -4.0], 0), ([-2.0, -1.0, -1.0, -4.0], 1), ([-2.0, -1.0, -1.0, -4.0], 2),
    ([-5.0, -5.0, -5.0, -5.0], 0), ([-5.0, -5.0, -5.0, -5.0], 3), ([-9.0, -8.0, -7.0, -1.0], 3),
])
def test_mmlu_accuracy_matches_harness(loglikelihoods, gold):
    doc = {"question": "2 + 2 =", "subject": "abstract_algebra", "choices": ["1", "2", "3", "4"], "answer": gold}
    harness_choices, scores = harness_multiple_choice(MMLU_YAML, doc, loglikelihoods)
    continuations = [" " + letter for letter in harness_choices]
    assert scoring.multiple_choice_score(loglikelihoods, gold, continuations)["acc"] == scores["acc"]


def test_multiple_choice_by_hand():
    tie = scoring.multiple_choice_score([-2.0, -2.0], 1, [" a", " b"])
    assert tie == {"acc": 0.0, "acc_norm": 0.0}
    # Per character, not per byte: "café" is 4 characters (5 bytes), -4.4 / 4 = -1.1 < -5.0 / 5.
    assert scoring.multiple_choice_score([-4.4, -5.0], 1, [" café", " abcde"]) == {"acc": 0.0, "acc_norm": 1.0}


def test_multiple_choice_refuses_continuations_without_delimiter():
    with pytest.raises(ValueError, match="target delimiter"):
        scoring.multiple_choice_score([-1.0, -2.0], 0, ["a", " b"])


# --- DROP (drop) ---

TEN_WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet"
DROP_CASES = [  # (prediction, gold answers: each a list of spans)
    ("5", [["5"]]),
    ("5.0", [["5"]]),
    (" 5 ", [["5"]]),
    ("5.00", [["5"]]),
    ("five", [["5"]]),
    ("6", [["5"]]),
    ("5 yards", [["5"]]),
    ("5 yards", [["5 yards"]]),
    ("5-yard", [["5 yards"]]),
    ("-5", [["5"]]),
    ("1,000", [["1000"]]),
    ("$1,000", [["1000"]]),
    ("50%", [["50"]]),
    ("1e3", [["1000"]]),
    ("2.50", [["2.5"]]),
    ("March 5, 2010", [["5 March 2010"]]),
    ("March 2010", [["5 March 2010"]]),
    ("1999", [["December 31 1999"]]),
    ("Smith", [["Smith", "Jones"]]),
    ("Smith and Jones", [["Smith", "Jones"]]),
    ("Smith Jones", [["Smith Jones"]]),
    ("the Eiffel Tower", [["Eiffel Tower"]]),
    ("An apple", [["apple"]]),
    ("St. Louis", [["St Louis"]]),
    ("well-known", [["well known"]]),
    ("New York City", [["New York"]]),
    ("New York", [["New York City"]]),
    ("PARIS", [["paris"]]),
    ("Tom", [["Tom"], ["Thomas"]]),
    ("Thomas Smith", [["Tom"], ["Thomas"]]),
    ("x", [[""], ["x"]]),
    ("x", [[" "]]),
    ("", [[" "]]),
    ("", [[""], ["5"]]),
    ("", [["5"]]),
    ("", [["Tom"]]),
    ("the", [["a"]]),
    ("4 touchdowns", [["4"], ["four"]]),
    ("the 3 Musketeers", [["three musketeers"]]),
    ("nan", [["nan"]]),
    ("Bears, 24-17", [["Bears"]]),
    ("Chicago Bears", [["Bears", "Packers", "Lions", "Vikings"]]),
    (TEN_WORDS, [["alpha bravo charlie kilo lima mike november oscar papa quebec", "romeo", "sierra", "tango"]]),
    ("O'Brien", [["OBrien"]]),
    ("5 and 6", [["5", "6"]]),
    ("Smith", [["Smith", "Smith"]]),
]


@pytest.mark.parametrize("prediction,gold_answers", DROP_CASES)
def test_drop_matches_harness(prediction, gold_answers):
    harness = harness_drop.process_results({"answers": [tuple(spans) for spans in gold_answers]}, [prediction])
    assert scoring.drop_score(prediction, gold_answers) == {"em": float(harness["em"]), "f1": float(harness["f1"])}


def test_drop_by_hand():
    assert scoring.drop_score("5.0", [["5"]]) == {"em": 1.0, "f1": 1.0}
    assert scoring.drop_score("five", [["5"]]) == {"em": 0.0, "f1": 0.0}
    assert scoring.drop_score("5 yards", [["5"]]) == {"em": 0.0, "f1": 0.67}
    assert scoring.drop_score("Smith", [["Smith", "Jones"]]) == {"em": 0.0, "f1": 0.5}
    # F1 0.3 against one of four gold spans is 0.075: numpy rounds it to 0.08 (Python's round() would give 0.07).
    four_spans = ["alpha bravo charlie kilo lima mike november oscar papa quebec", "romeo", "sierra", "tango"]
    assert scoring.drop_score(TEN_WORDS, [four_spans])["f1"] == 0.08


# --- MATH (minerva_math) ---

def minerva(answer: str) -> str:
    return f" We compute.\nFinal Answer: The final answer is {answer}. I hope it is correct.\n\n"


MATH_GENERATIONS = [
    minerva("$5$"),
    minerva("5"),
    " Final Answer: The final answer is $5$.",
    " Final Answer: The final answer is $5$. ",
    " Final Answer: The final answer is $5$. I hope it is correct",
    " Final Answer: The final answer is $5$.\nI hope it is correct.",
    " The final answer is $5$. I hope it is correct.",
    minerva("$3$") + minerva("$4$"),
    minerva("$\\frac{1}{2}$"),
    " Final Answer: The final answer is 3.5. I hope it is correct.",
    " Final Answer: The final answer is. I hope it is correct.",
    " Final Answer: The final answer is $x = 2$! I hope it is correct.",
    "",
]


@pytest.mark.parametrize("generation", MATH_GENERATIONS)
def test_math_answer_matches_harness(generation):
    assert scoring.math_answer(generation) == harness_math.get_unnormalized_answer(generation)


MATH_ANSWERS = [
    "5", "$5$", "\\boxed{5}", "\\$5.00", "5 dollars", "x = 5", "y = 2x + 1", "1,000", "1,000,000", "-1,234",
    "12{,}000", "0,1", "(0,1)", "(0, 1)", "\\left( 0, 1 \\right)", "[2,5)", "\\{1, 2\\}", "\\frac12", "\\frac{1}{2}",
    "\\dfrac{1}{2}", "-\\frac{2}{3}", "\\frac{\\sqrt{3}}{2}", "\\sqrt2", "\\sqrt{2}", "3\\sqrt{2}", "\\sqrt[3]{8}",
    "\\sqrt[3]8", "\\frac ab", "5 \\text{ cm}", "5\\text{ cm}^2", "5\\mbox{ inches}", "2\\pi cm", "12 feet",
    "17 square units", "4 \\text{ units}^2", "90^\\circ", "90^{\\circ}", "45 degrees", "\\text{(A)}", "\\textbf{(C)}",
    "\\overline{AB}", "\\text{Tuesday}", "a triangle", "an octagon", "10\\%", "3 \\cdot 10^5", "\\infty",
    "(-\\infty, 2] \\cup [3, \\infty)", "1, 2, \\ldots, 9", "5\\;", "1,\\!000", "\"yes\"", "10\\text{th}",
    "3\\mathrm{th}", "2\\text{ and }3", "2,\\text{and}3", "\\$32.50", "32.50.", "x^2 + 2x + 1", "\\text{m}",
    "6 \\text{ hours}", "8 ways", "20 students", "\\left\\lfloor 5 \\right\\rfloor", "\\begin{pmatrix} 1 \\\\ 2 "
    "\\end{pmatrix}", "0.5", ".5", "5ft", "\\ftp", "sue", "3\\text{ s}", "\\text{\ns}",
    "\\boxed{\\frac{1}{2}}", "$\\frac{1}{2}$ and $\\frac{1}{3}$", "[invalidanswer]", "",
]


@pytest.mark.parametrize("answer", MATH_ANSWERS)
def test_normalize_math_answer_matches_harness(answer):
    assert scoring.normalize_math_answer(answer) == harness_math.normalize_final_answer(answer)


MATH_SCORE_CASES = [  # (answer in the generation, gold answer, True where only the harness's sympy check matches)
    ("$5$", "5", False),
    ("5", "\\boxed{5}", False),
    ("5", "6", False),
    ("\\frac{1}{2}", "\\frac12", False),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("0.5", "\\frac{1}{2}", True),
    ("1+x", "x+1", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("5.0", "5", True),
    ("5 \\text{ cm}", "5", False),
    ("\\$1,000", "1000", False),
    ("(0,1)", "(0, 1)", False),
    ("(0,1)", "(1,0)", False),
    ("[2,5)", "[2, 5)", False),
    ("x = 3", "3", False),
    ("\\text{(A)}", "A", True),
    ("90^\\circ", "90", False),
    ("12 feet", "12", False),
    ("a triangle", "triangle", False),
    ("3.50", "3.5", True),
    ("\\infty", "\\infty", False),
    ("-\\frac{2}{3}", "-\\frac23", False),
]


@pytest.mark.parametrize("answer,gold,only_sympy_matches", MATH_SCORE_CASES)
def test_math_score_matches_harness_string_match(answer, gold, only_sympy_matches):
    generation = minerva(answer)
    harness_candidate = harness_math.normalize_final_answer(harness_math.get_unnormalized_answer(generation))
    harness = float(harness_math.is_equiv(harness_candidate, harness_math.normalize_final_answer(gold)))
    ours = scoring.math_score(generation, gold)["exact_match"]
    if only_sympy_matches:
        assert (harness, ours) == (1.0, 0.0)
    else:
        assert ours == harness


def test_math_by_hand():
    assert scoring.math_answer(" Final Answer: The final answer is $5$.") == scoring.INVALID_MATH_ANSWER
    assert scoring.normalize_math_answer("\\boxed{\\dfrac{1}{2}} \\text{ cm}") == "\\dfrac{1}{2}"
    assert scoring.math_score(minerva("$1,000$"), "1000") == {"exact_match": 1.0}
    assert scoring.math_score(minerva(""), "") == {"exact_match": 0.0}
