"""Our checkpoints as an lm-evaluation-harness model, so that any harness task runs on them offline:

    import lm_eval
    from mhc_jax.evals.lm_eval_adapter import HarnessModel
    lm_eval.simple_evaluate(model=HarnessModel(workdir="runs/mhc-10m"), tasks=[...])

lm-eval is an optional dependency (pip install lm-eval==0.4.13); nothing else imports this file.
"""

from lm_eval.api.model import LM

from mhc_jax.evals.harness import LanguageModel

DEFAULT_MAX_NEW_TOKENS = 256


class HarnessModel(LM):
    """lm-eval's LM interface over a restored checkpoint (mhc_jax.evals.harness.LanguageModel)."""

    def __init__(self, workdir: str, step: int | None = None, batch_size: int = 8, max_length: int = 2048):
        super().__init__()
        self.model = LanguageModel(workdir, None if step is None else int(step), int(batch_size), int(max_length))

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.model.loglikelihood([request.args for request in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        return self.model.rolling_loglikelihood([request.args[0] for request in requests])

    def generate_until(self, requests) -> list[str]:
        """Requests that share stop sequences and a token budget are decoded together."""
        outputs: list = [None] * len(requests)
        groups: dict = {}
        for index, request in enumerate(requests):
            context, options = request.args
            until = options.get("until", [])
            key = (tuple([until] if isinstance(until, str) else until),
                   int(options.get("max_gen_toks", DEFAULT_MAX_NEW_TOKENS)))
            groups.setdefault(key, []).append((index, context))
        for (until, max_new_tokens), members in groups.items():
            texts = self.model.generate([context for _, context in members], until, max_new_tokens)
            for (index, _), text in zip(members, texts):
                outputs[index] = text
        return outputs
