"""The actions that reach the database: promo codes, product recommendations and the
prize wheel. Each is declared once, model and executor together (see ``actions``)."""

from __future__ import annotations

from pydantic import Field

from bot_platform.errors import FlowError
from bot_platform.flows.actions import ActionSpec
from bot_platform.flows.base import NAME_PATTERN, Spec
from bot_platform.flows.turn import Position, SendEffect, Turn, interpolate
from bot_platform.types import Button, Card, Outgoing


class PromoCodeSpec(Spec):
    """Draw a unique code from ``pool`` into ``attribute`` (None when the pool is empty);
    a contact gets the same code again unless ``once_per_contact`` is false."""

    pool: str
    attribute: str = "promo_code"
    once_per_contact: bool = True


class PromoCodeAction(ActionSpec):
    promo_code: PromoCodeSpec

    async def run(self, turn: Turn, position: Position) -> None:
        from bot_platform.promo import draw_code

        session, _ = turn.platform()
        spec = self.promo_code
        code = await draw_code(
            session, pool=interpolate(spec.pool, turn), contact_id=turn.contact_id,
            subscriber_id=turn.subscriber_id, now=turn.now,
            once_per_contact=spec.once_per_contact)
        turn.attributes[spec.attribute] = code
        turn.attributes_changed = True


class RecommendSpec(Spec):
    """Show a carousel of up to ``limit`` in-stock products the contact has not bought:
    co-purchases first (when ``co_purchase``), then products matching ``category`` and
    ``tags`` (plus tags read from the attributes in ``tags_from``, e.g. a quiz result)."""

    limit: int = Field(default=3, ge=1, le=10)
    category: str | None = None
    tags: list[str] = Field(default_factory=list)
    tags_from: list[str] = Field(default_factory=list)
    use_subscriber_tags: bool = False
    co_purchase: bool = True
    say: str | None = None  # catalog key of the text above the carousel
    button: str | None = None  # catalog key of each card's button label
    empty: str | None = None  # catalog key sent when there is nothing to recommend
    attribute: str = "recommended"  # the skus shown, for conditions and analytics
    campaign: str | None = None  # utm_campaign (default: the flow's name)

    def catalog_keys(self) -> list[tuple[str, str]]:
        return [(f, k) for f, k in (("say", self.say), ("button", self.button),
                                     ("empty", self.empty)) if k]


class RecommendAction(ActionSpec):
    recommend: RecommendSpec

    async def run(self, turn: Turn, position: Position) -> None:
        from bot_platform.catalog import recommend, tracked_link

        session, services = turn.platform()
        spec = self.recommend
        tags = [*spec.tags, *(str(turn.lookup(a)) for a in spec.tags_from if turn.lookup(a))]
        if spec.use_subscriber_tags:
            tags.extend(turn.tags)
        products = await recommend(session, contact_id=turn.contact_id, limit=spec.limit,
                                   category=spec.category, tags=tags,
                                   co_purchase=spec.co_purchase)
        turn.attributes[spec.attribute] = [p.sku for p in products]
        turn.attributes_changed = True
        catalogs = services.catalogs
        variables = turn.variables(catalogs)
        if not products:
            if spec.empty:
                text = catalogs.format(turn.locale, spec.empty, variables)
                turn.effects.append(SendEffect(position.flow, Outgoing(text=text)))
            return
        label = catalogs.format(turn.locale, spec.button, variables) if spec.button else None
        cards = []
        for product in products:
            link = await tracked_link(
                session, url=product.url, subscriber_id=turn.subscriber_id,
                channel=turn.channel, campaign=spec.campaign or position.flow, now=turn.now,
                public_url=services.public_url, sku=product.sku, flow=position.flow)
            price = (f"{product.price:.2f} {product.currency or ''}".strip()
                     if product.price is not None else None)
            cards.append(Card(title=product.title, subtitle=price,
                              image_url=product.image_url, url=link,
                              buttons=(Button(title=label or product.title, url=link),)))
        text = catalogs.format(turn.locale, spec.say, variables) if spec.say else ""
        turn.effects.append(SendEffect(position.flow, Outgoing(text=text, cards=tuple(cards))))


class PrizeSpec(Spec):
    """One sector of the wheel. ``pool``: paid out as a code from that pool (in stock while
    it has free codes); ``stock``: at most this many wins; ``label``: catalog key."""

    name: str = Field(pattern=NAME_PATTERN)
    weight: float = Field(ge=0)
    label: str
    pool: str | None = None
    stock: int | None = Field(default=None, ge=0)


class SpinSpec(Spec):
    """Spin the wheel of ``game``: sets ``attribute`` to the prize's name (``no_spins``
    once the allowance is used, ``already_won`` once the contact has won ``max_wins``
    prizes, ``out_of_prizes`` when nothing is left), and ``<attribute>_label``,
    ``<attribute>_pool`` and ``<attribute>_code`` (the code reserved for the win, drawn
    before the outcome is announced).

    A prize with neither ``pool`` nor ``stock`` is a blank ("nothing this time"): it does
    not count as a win."""

    game: str = Field(pattern=NAME_PATTERN)
    prizes: list[PrizeSpec] = Field(min_length=1)
    max_spins: int = Field(default=3, ge=0)
    # Extra spins per new subscriber who came through the contact's referral link; the
    # referred friend gets the same bonus once.
    referral_bonus: int = Field(default=1, ge=0)
    max_wins: int | None = Field(default=1, ge=1)  # prizes per contact; null: no limit
    attribute: str = "prize"

    def catalog_keys(self) -> list[tuple[str, str]]:
        return [(f"prizes[{i}].label", p.label) for i, p in enumerate(self.prizes)]


class SpinAction(ActionSpec):
    spin: SpinSpec

    async def run(self, turn: Turn, position: Position) -> None:
        from bot_platform import games

        session, services = turn.platform()
        spec, name = self.spin, self.spin.attribute
        outcome = await games.spin(session, contact_id=turn.contact_id,
                                   subscriber_id=turn.subscriber_id, spec=spec,
                                   rng=services.random, now=turn.now)
        turn.attributes_changed = True
        turn.attributes[name] = outcome.result
        turn.attributes[f"{name}_pool"] = outcome.prize.pool if outcome.prize else None
        if outcome.code is not None:
            # Kept until the next win: an old "get my code" button shows this same code.
            turn.attributes[f"{name}_code"] = outcome.code
        if outcome.prize is not None:
            turn.attributes[f"{name}_label"] = services.catalogs.format(
                turn.locale, outcome.prize.label, turn.variables(services.catalogs))


class SpinsLeftSpec(Spec):
    """Put the contact's spins left on the wheel of ``game`` (spun by a ``spin`` action of
    the same flow, whose allowance it uses) into ``attribute``; 0 once a win used up
    ``max_wins``."""

    game: str = Field(pattern=NAME_PATTERN)
    attribute: str = "spins_left"


class SpinsLeftAction(ActionSpec):
    spins_left: SpinsLeftSpec

    async def run(self, turn: Turn, position: Position) -> None:
        from bot_platform import games

        session, services = turn.platform()
        spec = services.flows[position.flow].spec.spin_spec(self.spins_left.game)
        if spec is None:  # check_flow rejects this at load
            raise FlowError(f"flow {position.flow!r} has no spin of {self.spins_left.game!r}")
        turn.attributes[self.spins_left.attribute] = await games.spins_left(
            session, turn.contact_id, spec)
        turn.attributes_changed = True
