"""Where a request's tokens sit for rotary: the model runner asks the language model once per request
(`plan_positions`) and then slices the plan for every step's tokens."""

import torch


class LinearPositions:
    """1-D: token i of a request sits at position i (images included)."""

    def slice(self, start: int, num_tokens: int) -> torch.Tensor:
        return torch.arange(start, start + num_tokens)


class TablePositions:
    """Positions read from a table for the prompt ([dims, num_prompt_tokens]), then counting on from
    `next_position` for every output token (M-RoPE's decode position delta). All dims equal past the
    prompt."""

    def __init__(self, table: torch.Tensor, next_position: int):
        self.table = table
        self.delta = next_position - table.shape[1]

    def slice(self, start: int, num_tokens: int) -> torch.Tensor:
        end, num_prompt = start + num_tokens, self.table.shape[1]
        prompt = self.table[:, start:min(end, num_prompt)]
        if end <= num_prompt:
            return prompt
        after = torch.arange(max(start, num_prompt), end) + self.delta
        return torch.cat((prompt, after.expand(self.table.shape[0], -1)), dim=1)
