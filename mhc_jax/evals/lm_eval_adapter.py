"""Our checkpoints as an lm-evaluation-harness model, so that any harness task runs on them offline:

    import lm_eval
    from mhc_jax.evals.lm_eval_adapter import HarnessModel
    lm_eval.simple_evaluate(model=HarnessModel(workdir="runs/mhc-10m"), tasks=[...])

lm-eval is an optional dependency (pip install lm-eval==0.4.13); nothing else imports this file.
"""

from lm_eval.api.model import LM
from lm_eval.models.utils import normalize_gen_kwargs

from mhc_jax.evals.harness import LanguageModel

DEFAULT_MAX_NEW_TOKENS = 256
# Generation kwargs that change nothing when they have these values; any other kwarg or value is refused.
NO_OPS = {"top_p": (1.0, None), "top_k": (0, None), "num_beams": (1, None)}


class HarnessModel(LM):
    """lm-eval's LM interface over a restored checkpoint (mhc_jax.evals.harness.LanguageModel).
    Generation honours the requests' kwargs as lm-eval normalizes them: greedy unless do_sample, then
    sampling at `temperature` with `seed` (the request's, else this model's); kwargs our decoder cannot
    honour (top-p, top-k, beams) are refused with a ValueError rather than ignored."""

    def __init__(self, workdir: str, step: int | None = None, batch_size: int | str = "auto", max_length: int = 2048,
                 seed: int = 0, mesh: str = "auto"):
        super().__init__()
        batch_size = batch_size if batch_size == "auto" else int(batch_size)
        self.model = LanguageModel(workdir, None if step is None else int(step), batch_size, int(max_length), mesh)
        self.seed = int(seed)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.model.loglikelihood([request.args for request in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        return self.model.rolling_loglikelihood([request.args[0] for request in requests])

    def decoding(self, options: dict) -> tuple:
        """(stop sequences, token budget, temperature (0: greedy), seed) of one request's kwargs."""
        kwargs = dict(normalize_gen_kwargs(options, DEFAULT_MAX_NEW_TOKENS))
        until, budget = tuple(kwargs.pop("until")), kwargs.pop("max_gen_toks")
        do_sample, temperature = kwargs.pop("do_sample"), float(kwargs.pop("temperature", 0.0))
        seed = int(kwargs.pop("seed", self.seed))
        refused = {k: v for k, v in kwargs.items() if v not in NO_OPS.get(k, ())}
        if refused:
            raise ValueError(f"generation kwargs {refused}: our decoder does greedy or temperature sampling only "
                             "(do_sample, temperature, seed, until, max_gen_toks)")
        if do_sample and temperature <= 0:
            raise ValueError(f"do_sample=True needs a temperature > 0, got {temperature}")
        return until, int(budget), temperature if do_sample else 0.0, seed

    def generate_until(self, requests) -> list[str]:
        """Requests that share their decoding settings are decoded together."""
        outputs: list = [None] * len(requests)
        groups: dict = {}
        for index, request in enumerate(requests):
            context, options = request.args
            groups.setdefault(self.decoding(options), []).append((index, context))
        for (until, max_new_tokens, temperature, seed), members in groups.items():
            texts = self.model.generate([context for _, context in members], until, max_new_tokens,
                                        temperature=temperature, seed=seed)
            for (index, _), text in zip(members, texts):
                outputs[index] = text
        return outputs
