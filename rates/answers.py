"""`GET /api/v1/rates/{base}/{quote}` and `GET|POST /api/v1/convert`: their one handler each.

Both entrances call these with input already validated by the routes' own schemas (`PairPath`,
`ConvertQuery`, `ConvertIn`): the ninja routes (`rates.api`) through ninja, the edge's route
table (`edge.routes`) through the same models. They read through `rates.ondemand` (tracked pairs
from the snapshot, others on demand) and render the bytes both entrances send; PairNotPriced and
ProvidersUnavailable and OnDemandBudgetExceeded leave as `edge.errors` maps them (404, 503, 429).
"""

from __future__ import annotations

from edge.answer import Answer, render
from rates import ondemand
from rates.providers import Pair
from rates.schemas import ConvertIn, ConvertOut, PairPath, PairRateOut


async def pair_answer(pair: PairPath, client: str, *, expand: bool = False) -> Answer:
    """`client` (edge.clients) pays for a pair priced anew (rates.ondemand's budgets)."""
    priced = await ondemand.pair_rate(
        Pair(pair.base, pair.quote), client=client or None, expand=expand
    )
    return render(PairRateOut, priced)


async def convert_answer(asked: ConvertIn, client: str) -> Answer:
    result = await ondemand.convert(
        source=asked.from_,
        target=asked.to,
        amount=asked.amount,
        client=client or None,
        side=asked.side,
        expand=asked.expand is not None,
    )
    return render(ConvertOut, result, by_alias=True)
