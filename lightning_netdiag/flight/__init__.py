"""The flight recorder's parts, pure torch: the lifeline (what keeps its window when the process ends)."""
