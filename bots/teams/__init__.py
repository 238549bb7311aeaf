"""Microsoft Teams: the Bot Framework protocol spoken directly with aiohttp
(see docs/chatops.md for why not the Agents SDK)."""
