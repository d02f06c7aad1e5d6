"""Tools around training: export, generate, leaderboard, report, memory estimate, speed plan."""
