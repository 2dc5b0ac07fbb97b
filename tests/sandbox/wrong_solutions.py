"""Wrong HumanEval completions, each failing in a different way. The reference evaluator
may run these (they are ours); every one of them must fail."""

WRONG_COMPLETIONS = {
    "HumanEval/0": "    return False\n",  # wrong answer
    "HumanEval/2": "    return number\n",  # wrong answer, float
    "HumanEval/7": "    return [x for x in strings if substring in x\n",  # does not compile
    "HumanEval/12": "    return max(strings, key=len)\n",  # crashes on the empty list
    "HumanEval/13": "    return a * b\n",  # wrong answer
    "HumanEval/16": "    return len(set(string))\n",  # misses the case-folding
    "HumanEval/23": "    return len(string) + 1\n",  # off by one
    "HumanEval/28": "    import sys\n    sys.exit(0)\n",  # exits early with status 0
    "HumanEval/29": "    return [x for x in strings if x.endswith(prefix)]\n",  # wrong end
    "HumanEval/35": "    return min(l)\n",  # wrong answer
    "HumanEval/53": "    raise NotImplementedError\n",  # raises
    "HumanEval/55": "    return fib(n - 1) + fib(n - 2)\n",  # unbounded recursion
    "HumanEval/60": "    while True:\n        pass\n",  # never returns
}
WRONG_TIMEOUT_S = 2.0
