"""A chain: pass a Token where a value is expected, and the task waits for it.

``summarize(count_words(clean(fetch(name))))`` submits four tasks at once; each starts when the
token it was given has resolved, holding no worker while it waits. If a step fails, the steps
after it fail with ``DependencyFailed`` without running.

Run it with ``python examples/chain.py``.
"""

from __future__ import annotations

from tokengate import DependencyFailed, OperationsCoordinator, task_token_guard

DOCUMENTS = {
    "poem": "The quick brown fox   jumps over the lazy dog. The dog sleeps.",
    "empty": "",
}


@task_token_guard(operation_type="fetch")
def fetch(name: str) -> str:
    return DOCUMENTS[name]  # a KeyError fails this step and every step after it


@task_token_guard(operation_type="clean")
def clean(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


@task_token_guard(operation_type="count_words")
def count_words(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for word in text.split():
        counts[word] = counts.get(word, 0) + 1
    return counts


@task_token_guard(operation_type="summarize")
def summarize(counts: dict[str, int]) -> str:
    if not counts:
        return "no words"
    top = max(counts, key=lambda word: (counts[word], word))
    return f"{sum(counts.values())} words, most frequent: {top!r} ({counts[top]}x)"


def main() -> None:
    with OperationsCoordinator():
        for name in ("poem", "empty", "missing"):
            result = summarize(count_words(clean(fetch(name))))  # four tokens, one chain
            try:
                print(f"{name}: {result.get(timeout=30)}")
            except DependencyFailed as exc:
                root: BaseException = exc  # each failed step is chained to the one before it
                while isinstance(root, DependencyFailed) and root.__cause__ is not None:
                    root = root.__cause__
                print(f"{name}: did not run, the chain broke with {type(root).__name__}: {root}")


if __name__ == "__main__":
    main()
