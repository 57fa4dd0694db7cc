"""Rewards: math answer verification, sandboxed code execution, group advantages and an
optional LLM-judge process reward. Reward functions never raise on model output."""

from tracerl.rewards.advantages import (
    ADVANTAGES,
    GROUP_FILTERS,
    GroupAdvantages,
    compute_group_advantages,
)
from tracerl.rewards.code import CodeScore, extract_code, score_code_batch
from tracerl.rewards.math_answers import (
    MathScore,
    extract_answer,
    extract_boxed,
    score_math,
    verify_answer,
)
from tracerl.rewards.process import HFJudge, Judge, VLLMJudge, process_rewards
from tracerl.rewards.sandbox import (
    CodeJob,
    ProgramResult,
    SandboxLimits,
    SandboxUnavailable,
    isolation_problems,
    limits_from,
    run_function_tests,
    run_jobs,
    run_stdio_tests,
)
from tracerl.rewards.scoring import grading_options, score_rollouts

__all__ = [
    "ADVANTAGES", "GROUP_FILTERS", "CodeJob", "CodeScore", "GroupAdvantages", "HFJudge",
    "Judge", "MathScore", "ProgramResult", "SandboxLimits", "SandboxUnavailable", "VLLMJudge",
    "compute_group_advantages", "extract_answer", "extract_boxed", "extract_code", "grading_options",
    "isolation_problems", "limits_from", "process_rewards", "run_function_tests", "run_jobs",
    "run_stdio_tests", "score_code_batch", "score_math", "score_rollouts", "verify_answer",
]
