"""Generate the bundled synthetic financial datasets (FinLoRA row format: {"context": ..., "target": ...}).

Commands (any working directory):
    python data/make_datasets.py                 # rewrites data/train/*.jsonl and data/test/*.jsonl
    python data/make_datasets.py --out /tmp/d    # writes /tmp/d/train/*.jsonl and /tmp/d/test/*.jsonl

Preference pairs for dpo recipes ({"context", "chosen", "rejected"}: the right answer chosen, a plausible wrong one
rejected: another label, one entity's type swapped, a near-miss number) go to data/preference/<task>_{train,test}.jsonl,
the test pairs (held out) from the test rows. data/chat/sentiment_train.jsonl holds the sentiment train rows as chat
rows ({"messages": [user: context, assistant: target]}).

Three tasks, each 600 train rows and 200 test rows: news sentiment (negative/neutral/positive), named-entity
extraction (ORG/PER/LOC) and numeric questions on statement snippets. A fourth, arith, is the reinforcement-learning
task: one-step dollar arithmetic with whole-number answers whose difficulty is ARITH_MAX_OPERAND (1000 training
prompts, a 200-row format lesson for the warm start, a fixed 300-row test). Every sentence is composed here from
templates and vocabularies written for this project: company, broker and person names are invented, cities and
countries are real places, figures are random. No third-party dataset text is used.

Deterministic by construction: one seeded `random.Random` per task and split, lists only (never iteration over a
set), Decimal arithmetic with ROUND_HALF_UP for numeric answers. Running it again reproduces the files byte for
byte; tests/test_bundled_data.py checks that. Test rows draw names from the full vocabularies while train rows
see only 80% of them, so the test split also measures generalisation to unseen names.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import NamedTuple

SEED = 20250
TRAIN_ROWS = 600
TEST_ROWS = 200
TRAIN_NAME_SHARE = 0.8
ANSWER_SUFFIX = "Answer: "

SENTIMENT_INSTRUCTION = (
    "Instruction: What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
)
ENTITY_INSTRUCTION = (
    "Instruction: Extract the named entities (organisations, persons, locations) from the sentence. Answer with "
    "'entity, type' pairs separated by '; ' in order of appearance, types ORG, PER, LOC; answer 'none' if there "
    "are none."
)
CALC_INSTRUCTION = "Instruction: Answer the question with a number only."
ROUNDING_RULES = {0: "Round to the nearest whole number.", 1: "Round to one decimal.", 2: "Round to two decimals."}
SENTIMENT_LABELS = ["negative", "neutral", "positive"]

# ---------------------------------------------------------------------------------------------------------------
# Vocabularies (all invented for this project, except real place names)
# ---------------------------------------------------------------------------------------------------------------

COMPANY_ROOTS = [
    "Harlow", "Nordvik", "Castellan", "Aldermoor", "Brightwater", "Vessa", "Kestrel", "Marwick", "Pellan", "Arvena",
    "Belcourt", "Corvant", "Tessaro", "Ravelin", "Solvary", "Quillon", "Tavora", "Merrow", "Lindgate", "Ostberg",
    "Varenne", "Greyfield", "Ashcombe", "Fenwick", "Glenmoor", "Juniper", "Larkspur", "Monteval", "Orsino",
    "Pinecrest", "Redhaven", "Silverline", "Trevani", "Valmont", "Westmark", "Yarrow", "Alderic", "Bramhall",
    "Draycott", "Everhart", "Falkner", "Hollins", "Ingleby", "Kalvora", "Lumeris", "Norhaven", "Obersee", "Palmira",
    "Rosmark", "Stellan", "Tornvik", "Uppdal", "Veridane", "Wexford Hale", "Zandria", "Caldris", "Eskerly", "Frostholm",
    "Halvard", "Maravel", "Quenby", "Selkirk Vale", "Tamsin", "Northpoint", "Bluecliff", "Ironwood", "Oakmere",
    "Cresthill", "Amberly", "Duvall",
]
LEGAL_FORMS = ["", "", "", " Group", " Holdings", " plc", " AG", " ASA", " AB", " Oyj", " SE", " NV"]

# Each sector: name suffixes, how news calls such a firm, what it sells, its business units, the volume measure
# analysts watch, and what a contract win looks like (None: the sector does not win "contracts" in the news).
SECTORS = {
    "bank": {
        "suffixes": ["Bank", "Capital", "Financial"], "nouns": ["bank", "lender"],
        "products": ["mortgages", "corporate loans", "payment services", "savings products"],
        "units": ["retail banking", "asset management", "corporate banking", "markets"],
        "volume": "lending volume", "contract": None,
    },
    "insurance": {
        "suffixes": ["Insurance", "Assurance", "Mutual"], "nouns": ["insurer"],
        "products": ["motor insurance", "life insurance policies", "pension products"],
        "units": ["life", "non-life", "reinsurance"], "volume": "gross written premiums", "contract": None,
    },
    "shipping": {
        "suffixes": ["Shipping", "Lines", "Maritime"], "nouns": ["shipping company", "shipowner"],
        "products": ["container freight", "dry bulk transport", "tanker services"],
        "units": ["container", "tanker", "port services"], "volume": "cargo volume",
        "contract": "to transport iron ore for a mining group",
    },
    "tech": {
        "suffixes": ["Systems", "Software", "Technologies"], "nouns": ["software company", "IT services group"],
        "products": ["cloud software", "payment terminals", "cybersecurity services", "data centre services"],
        "units": ["cloud", "consulting", "hardware"], "volume": "annual recurring revenue",
        "contract": "to deliver a new billing system to a regional utility",
    },
    "telecom": {
        "suffixes": ["Telecom", "Networks", "Mobile"], "nouns": ["telecom operator", "network operator"],
        "products": ["mobile data plans", "fibre broadband", "network equipment"],
        "units": ["consumer", "enterprise", "network infrastructure"], "volume": "subscriber base",
        "contract": "to build a 5G network for a national rail operator",
    },
    "energy": {
        "suffixes": ["Energy", "Power", "Renewables"], "nouns": ["utility", "power producer"],
        "products": ["electricity", "wind power", "district heating"],
        "units": ["generation", "distribution", "trading"], "volume": "power generation",
        "contract": "to supply electricity to a steel plant",
    },
    "materials": {
        "suffixes": ["Steel", "Metals", "Mining"], "nouns": ["steelmaker", "metals group", "miner"],
        "products": ["stainless steel", "copper", "nickel", "steel plate"],
        "units": ["stainless", "long products", "mining"], "volume": "steel deliveries",
        "contract": "to supply steel plate to a shipyard",
    },
    "paper": {
        "suffixes": ["Paper", "Packaging", "Forest Industries"], "nouns": ["packaging maker", "forest products group"],
        "products": ["cartonboard", "pulp", "corrugated packaging", "sawn timber"],
        "units": ["packaging", "pulp", "wood products"], "volume": "paper deliveries",
        "contract": "to supply packaging to a dairy producer",
    },
    "food": {
        "suffixes": ["Foods", "Dairy", "Brewing"], "nouns": ["food group", "food maker"],
        "products": ["dairy products", "ready meals", "bottled beer", "frozen foods"],
        "units": ["dairy", "snacks", "beverages"], "volume": "sales volume",
        "contract": "to supply private-label products to a supermarket chain",
    },
    "engineering": {
        "suffixes": ["Engineering", "Industries", "Machinery"], "nouns": ["engineering group", "machinery maker"],
        "products": ["industrial pumps", "cranes", "elevators", "diesel engines"],
        "units": ["equipment", "services", "automation"], "volume": "order intake",
        "contract": "to deliver cranes to a container terminal",
    },
    "construction": {
        "suffixes": ["Construction", "Building", "Infrastructure"], "nouns": ["builder", "construction company"],
        "products": ["residential housing", "office buildings", "road projects"],
        "units": ["housing", "infrastructure", "commercial property"], "volume": "order backlog",
        "contract": "to build a hospital",
    },
    "retail": {
        "suffixes": ["Retail", "Stores", "Markets"], "nouns": ["retailer", "department store chain"],
        "products": ["groceries", "home furnishings", "consumer electronics", "clothing"],
        "units": ["grocery", "online", "home goods"], "volume": "like-for-like sales", "contract": None,
    },
    "pharma": {
        "suffixes": ["Pharma", "Therapeutics", "Biosciences"], "nouns": ["drugmaker", "pharmaceutical company"],
        "products": ["generic drugs", "vaccines", "diagnostic tests"],
        "units": ["consumer health", "specialty medicines", "diagnostics"], "volume": "prescription volume",
        "contract": "to supply vaccines to a national health service",
    },
    "autos": {
        "suffixes": ["Motors", "Automotive", "Components"], "nouns": ["carmaker", "car parts supplier"],
        "products": ["electric vans", "brake systems", "battery packs"],
        "units": ["vehicles", "components", "aftermarket"], "volume": "vehicle deliveries",
        "contract": "to supply battery packs to a bus manufacturer",
    },
}
BROKER_NAMES = [
    "Harbourline Securities", "Pemberton Equities", "Nordstrand Markets", "Calloway & Finch", "Ridgeway Research",
    "Altamira Partners", "Bellhaven Securities", "Oxmoor Capital Markets", "Stanwick Brokers", "Tiller & Roane",
    "Marlowe Analytics", "Greystone Equity Research",
]
# First names and surnames grouped by language so that a generated person reads as one plausible name.
PERSON_NAME_GROUPS = [
    (["Maria", "Henrik", "Anna", "Mikael", "Sofia", "Lars"], ["Lindqvist", "Dahl", "Berglund", "Nyström", "Halvorsen"]),
    (["Jukka", "Satu", "Timo", "Riikka", "Antti"], ["Virtanen", "Koskinen", "Heikkilä", "Lehtonen", "Salminen"]),
    (["Markus", "Katrin", "Stefan", "Julia", "Tobias"], ["Brenner", "Hoffmann", "Krüger", "Albrecht", "Vogel"]),
    (["Claire", "Julien", "Camille", "Antoine", "Élodie"], ["Moreau", "Lefèvre", "Girard", "Fontaine", "Rousseau"]),
    (["Luca", "Giulia", "Marco", "Chiara", "Paolo"], ["Moretti", "Bianchi", "Ferraro", "Conti", "Galli"]),
    (["Sofia", "Javier", "Lucía", "Diego", "Carmen"], ["Alvarez", "Navarro", "Ortega", "Serrano", "Delgado"]),
    (["James", "Emily", "Oliver", "Charlotte", "David"], ["Whitfield", "Harcourt", "Pemberton", "Ashworth", "Mercer"]),
    (["Olga", "Piotr", "Katarzyna", "Dmitri", "Tomasz"], ["Nowak", "Horvat", "Kovač", "Mazur", "Novak"]),
    (["Priya", "Rahul", "Ananya", "Vikram", "Neha"], ["Nair", "Mehta", "Iyer", "Kapoor", "Reddy"]),
    (["Kenji", "Yuki", "Haruto", "Aiko"], ["Watanabe", "Nakamura", "Kobayashi", "Fujita"]),
    (["Wei", "Xiu", "Jun", "Mei"], ["Zhang", "Chen", "Huang", "Lin"]),
    (["Ahmed", "Layla", "Omar", "Yasmin"], ["Haddad", "Rahman", "Nasser", "Khalil"]),
    (["Chinedu", "Amara", "Kwame", "Ngozi"], ["Okafor", "Mensah", "Adeyemi", "Boateng"]),
    (["Rafael", "Beatriz", "Thiago", "Camila"], ["Oliveira", "Carvalho", "Mendes", "Barbosa"]),
]
CITIES = [
    "Rotterdam", "Helsinki", "Stockholm", "Oslo", "Copenhagen", "Hamburg", "Frankfurt", "Munich", "Zurich", "Geneva",
    "Milan", "Madrid", "Lisbon", "Paris", "Lyon", "Brussels", "Amsterdam", "Warsaw", "Prague", "Vienna", "Dublin",
    "London", "Manchester", "Edinburgh", "New York", "Chicago", "Houston", "Toronto", "São Paulo", "Mexico City",
    "Singapore", "Hong Kong", "Shanghai", "Mumbai", "Bangalore", "Dubai", "Abu Dhabi", "Johannesburg", "Lagos",
    "Nairobi", "Sydney", "Melbourne", "Tokyo", "Seoul", "Jakarta", "Istanbul", "Tallinn", "Riga", "Vilnius",
    "Gothenburg", "Tampere", "Bergen", "Antwerp", "Barcelona", "Krakow",
]
COUNTRIES = [
    "Finland", "Sweden", "Norway", "Germany", "Poland", "Brazil", "India", "China", "Japan", "Canada", "Mexico",
    "France", "Spain", "Italy", "Indonesia", "Vietnam", "Turkey", "South Africa", "Kenya", "Nigeria", "Australia",
    "Chile", "Estonia", "Denmark", "Austria", "Portugal", "Belgium", "Ireland", "Singapore", "South Korea",
]
REGIONS = ["Europe", "Asia", "North America", "Latin America", "Scandinavia", "the Middle East", "Southeast Asia"]
EXCHANGES = ["Helsinki stock exchange", "Stockholm stock exchange", "Oslo Bors", "Frankfurt stock exchange",
             "London Stock Exchange", "Euronext Amsterdam", "SIX Swiss Exchange"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
QUARTER_WORDS = ["first", "second", "third", "fourth"]
YEARS = [2021, 2022, 2023, 2024, 2025]
ROLES = ["chief executive", "chief financial officer", "chair", "head of investor relations", "chief operating officer"]

# (ISO code, how the text writes "N million" with it, word used in "in millions of ...")
CURRENCIES = [
    ("EUR", ["EUR {n} million", "EUR {n} mn", "{n} million euros", "€{n} million"], "euros"),
    ("USD", ["USD {n} million", "${n} million", "{n} million dollars"], "US dollars"),
    ("GBP", ["GBP {n} million", "£{n} million", "{n} million pounds"], "pounds"),
    ("SEK", ["SEK {n} million", "SEK {n} mn"], "Swedish kronor"),
    ("NOK", ["NOK {n} million", "NOK {n} mn"], "Norwegian kroner"),
    ("CHF", ["CHF {n} million", "CHF {n} mn"], "Swiss francs"),
    ("DKK", ["DKK {n} million"], "Danish kroner"),
]
PER_SHARE_FORMS = {"EUR": "EUR {n}", "USD": "${n}", "GBP": "£{n}", "SEK": "SEK {n}", "NOK": "NOK {n}",
                   "CHF": "CHF {n}", "DKK": "DKK {n}"}


class Names(NamedTuple):
    """The name pools one split draws from."""

    companies: list[tuple[str, str]]  # (name, sector)
    brokers: list[str]
    persons: list[str]
    cities: list[str]
    countries: list[str]


def build_full_names() -> Names:
    """All invented companies and persons, built once from the vocabularies with a fixed seed."""
    rng = random.Random(SEED)
    sectors = list(SECTORS)
    companies = []
    for root in COMPANY_ROOTS:
        sector = rng.choice(sectors)
        companies.append((root + " " + rng.choice(SECTORS[sector]["suffixes"]) + rng.choice(LEGAL_FORMS), sector))
    persons = [first + " " + last for firsts, lasts in PERSON_NAME_GROUPS for first in firsts for last in lasts]
    return Names(companies, list(BROKER_NAMES), persons, list(CITIES), list(COUNTRIES))


def train_subset(full: Names) -> Names:
    """A fixed 80% of every name pool; the other 20% only ever appear in test rows."""
    rng = random.Random(SEED + 1)

    def keep(pool):
        return rng.sample(pool, max(2, int(len(pool) * TRAIN_NAME_SHARE)))

    return Names(*(keep(pool) for pool in full))


# ---------------------------------------------------------------------------------------------------------------
# Formatting of figures and periods
# ---------------------------------------------------------------------------------------------------------------


def format_amount(form: str, millions: float) -> str:
    """'EUR {n} million' with n filled in; amounts of a billion or more switch to billions."""
    if millions >= 1000:
        return form.replace(" mn", " million").replace("million", "billion").format(n=f"{millions / 1000:.2f}")
    return form.format(n=f"{millions:.1f}")


def format_pct(rng: random.Random, value: float) -> str:
    """A percentage as news writes it: '12%', '12.4%' or '12.4 percent'."""
    number = f"{value:.0f}" if rng.random() < 0.4 else f"{value:.1f}"
    return number + (" percent" if rng.random() < 0.2 else "%")


class Period(NamedTuple):
    noun: str  # "the third quarter of 2024": after "in", "for", "at the end of"
    adj: str  # "third-quarter": before "revenue", "results"


def random_period(rng: random.Random) -> Period:
    """A reporting period as a noun phrase and in attributive form: ('the third quarter', 'third-quarter')."""
    index, year = rng.randrange(4), rng.choice(YEARS)
    word = QUARTER_WORDS[index]
    return rng.choice([
        Period(f"the {word} quarter", f"{word}-quarter"), Period(f"the {word} quarter of {year}", f"{word}-quarter"),
        Period(f"Q{index + 1}", f"Q{index + 1}"), Period(f"Q{index + 1} {year}", f"Q{index + 1} {year}"),
        Period("the first half", "first-half"), Period(f"the first half of {year}", "first-half"),
        Period("the January-March period", "January-March"), Period("the July-September period", "July-September"),
        Period(str(year), str(year)), Period(f"the financial year {year}", "full-year"),
        Period("the October-December quarter", "October-December"), Period("the first nine months", "nine-month"),
    ])


def expand_alternatives(rng: random.Random, template: str) -> str:
    """Replace every '[a|b|c]' in a template by one of its alternatives."""
    return re.sub(r"\[([^\[\]]+)\]", lambda match: rng.choice(match.group(1).split("|")), template)


def fix_articles(text: str) -> str:
    """'a 8% rise' -> 'an 8% rise' (also 11, 18, 80-89, 800...: numbers read with a leading vowel sound)."""

    def article_for(match: re.Match) -> str:
        integer = match.group(1).split(".")[0].split(",")[0]
        return ("an " if integer.startswith("8") or integer in ("11", "18") else "a ") + match.group(1)

    return re.sub(r"\ba (\d[\d,]*(?:\.\d+)?)", article_for, text)


def fix_possessives(text: str) -> str:
    """News style for names ending in s: "Harlow Systems's" becomes "Harlow Systems'"."""
    return re.sub(r"(?<=s)'s\b", "'", text)


def random_date(rng: random.Random) -> str:
    """A date as news writes it: '14 June', 'June 14' or 'June 14, 2024'."""
    month, day = rng.choice(MONTHS), rng.randint(1, 28)
    return rng.choice([f"{day} {month}", f"{month} {day}", f"{month} {day}, {rng.choice(YEARS)}"])


# ---------------------------------------------------------------------------------------------------------------
# Task 1: news sentiment
# ---------------------------------------------------------------------------------------------------------------

# Core sentences without the final full stop; "[a|b|c]" picks one alternative per row. Negated positive words
# (did not meet, failed to, no longer expects growth) are negative, negated negative words (no longer expects a
# loss, does not expect job cuts) are positive, and negation inside factual news (did not disclose, has not
# changed) stays neutral, so a model cannot lean on single cue words. {period} is a noun phrase ("the third
# quarter"), {period_adj} its attributive form ("third-quarter").
SENTIMENT_TEMPLATES = {
    "positive": [
        "{co} reported a {pct_up} [rise|increase|jump] in {period_adj} net profit to {m_hi}{pos_driver}",
        "{co}'s operating profit [rose|climbed|increased|grew] to {m_hi} from {m_lo} in {period}{pos_driver}",
        "[Net sales|Revenue|Turnover] of {co} increased by {pct_up} to {m_hi} in {period}{pos_driver}",
        "Shares in {co} [jumped|rose|surged|climbed] {pct_small} after the {noun} raised its full-year "
        "[outlook|guidance|profit forecast]",
        "{co} has won a {m_attr} [contract|order] {contract}",
        "{co} [signed|secured] a [five-year|multi-year] [deal|agreement] {contract}, its largest order to date",
        "{broker} upgraded {co} to [buy|outperform|overweight] from [hold|neutral], citing [stronger margins and a "
        "healthy order book|improving cash flow|a faster recovery in {region}]",
        "{co} now expects {year} operating profit to grow by {pct_big}, up from its earlier forecast of {pct_small}",
        "The {noun} swung to a {period_adj} [profit|net profit] of {m} from a loss a year earlier",
        "{co} returned to profit in {period}, posting net income of {m} after a loss a year ago",
        "{co} beat [analysts' expectations|market forecasts] with {period_adj} earnings per share of {eps_hi}, "
        "against a consensus of {eps_lo}",
        "{co} will raise its dividend to {eps_hi} per share after a record year",
        "Demand for {product} remained strong, and {co} said its {volume} grew {pct_up} in {period}",
        "{co}'s {period_adj} revenue climbed {pct_up}{pos_driver}, and margins improved in all "
        "[divisions|business areas|regions]",
        "{co} said it no longer expects a loss for {year} and now forecasts a [small|modest] operating profit",
        "{co} completed its cost savings programme ahead of schedule, lifting its operating margin to "
        "{margin_hi} from {margin_lo}",
        "{co}'s [gross|operating] margin [widened|improved] to {margin_hi} in {period} from {margin_lo} a year earlier",
        "Shares of {co} hit a record high on {weekday} after it agreed to sell its {unit} unit for {m}, well above "
        "market estimates",
        "Despite {headwind}, {co} increased its {period_adj} operating profit by {pct_up}",
        "{co} does not expect any further job cuts this year, as orders for {product} have recovered strongly",
        "{co}'s net loss narrowed to {m_lo} in {period} from {m_hi} a year earlier{pos_driver}",
        "Sales at {co} were up {pct_small} in {month}, the strongest monthly gain in {n_years} years",
        "{co} raised its {year} sales guidance after its {volume} in {country} exceeded expectations",
        "The {noun}'s order backlog reached a record {m} at the end of {period}, up {pct_up} year on year",
        "{co} said profitability improved clearly in {period}, and it expects the positive trend to continue",
        "{co} beat forecasts as operating profit grew to {m_hi} from {m_lo}{pos_driver}",
        "{co} [is to|will] buy back up to {m} of its own shares after cash flow [more than doubled|improved "
        "strongly] in {period}",
        "Cash flow from operations at {co} improved to {m_hi} from {m_lo}, allowing the {noun} to cut its net debt",
        "Investors welcomed {co}'s {period_adj} report, sending the shares up {pct_small} in [early|afternoon] "
        "trading",
    ],
    "negative": [
        "{co} reported a {pct_down} [drop|fall|decline] in {period_adj} net profit to {m_lo}{neg_driver}",
        "{co}'s operating profit [fell|declined|dropped|slipped] to {m_lo} from {m_hi} in {period}{neg_driver}",
        "Shares in {co} [slumped|fell|tumbled|dropped] {pct_small} after the {noun} cut its full-year "
        "[guidance|outlook|profit forecast]",
        "{co} [plans to|will|is to] [cut|shed] {n_jobs} jobs in {country} as part of a restructuring programme",
        "{co} swung to a {period_adj} operating loss of {m} from a profit a year earlier{neg_driver}",
        "{broker} downgraded {co} to [sell|underperform|underweight], saying margins will stay under pressure",
        "{co}'s net loss widened to {m_hi} in {period} from {m_lo} a year earlier",
        "{co} did not meet its {year} sales target, and operating profit came in below analysts' estimates",
        "{co} failed to win the {m_attr} contract, which went to its rival {co2}",
        "{co} said it will not pay a dividend for {year}{neg_driver}",
        "The {noun} warned that {year} profit will be [significantly|substantially|clearly] lower than last "
        "year{neg_driver}",
        "Sales at {co} did not improve in {period}, and the company lowered its margin forecast",
        "{co} was fined {m} by the competition authority for breaching [reporting|pricing|data protection] rules",
        "Despite higher sales, {co}'s {period_adj} earnings per share fell to {eps_lo} from {eps_hi}",
        "{co}'s {volume} declined {pct_down} in {period} as customers postponed purchases",
        "{co} no longer expects revenue growth in {year} and has withdrawn its medium-term targets",
        "Sales at {co} were down {pct_small} in {month}, hurt by {headwind}",
        "{co} missed [analysts' expectations|market forecasts] with {period_adj} revenue of {m_lo}, against a "
        "consensus of {m_hi}",
        "{co} will close its plant in {city}, and about {n_jobs} employees are set to lose their jobs",
        "The price increases were not enough to offset higher costs, and {co}'s operating margin shrank to "
        "{margin_lo}",
        "{co}'s [gross|operating] margin [narrowed|shrank|fell] to {margin_lo} in {period} from {margin_hi} a year "
        "earlier",
        "{co} booked an impairment charge of {m} on its {unit} business{neg_driver}",
        "Revenue at the {noun} dropped {pct_down} to {m_lo}, and it expects no recovery before {next_year}",
        "{co} cut its outlook for the second time this year, blaming {headwind}",
        "Cash flow from operations at {co} turned negative in {period}, and net debt rose to {m}",
        "{co} suspended its share buyback programme after {period_adj} [earnings|profits] fell short of forecasts",
        "A rating agency cut {co}'s credit rating [by one notch|to junk], citing weak cash flow and high debt",
        "Investors sold {co} shares after its {period_adj} report, sending the stock down {pct_small}",
        "{co} has not been able to pass higher costs on to customers, and its {period_adj} profit fell {pct_down}",
    ],
    "neutral": [
        "{co} will publish its [results|interim report|financial statements] for {period} on {date}",
        "{co} has [appointed|named] {person} as {role}, effective {date}",
        "The annual general meeting of {co} will be held in {city} on {date}",
        "{co} employs about {n_emp} people and has operations in {n_countries} countries",
        "{co}'s net sales were [flat|stable] at {m} in {period}, unchanged from a year earlier",
        "{co} did not disclose the financial terms of its agreement with {co2}",
        "The transaction is expected to be completed in {period_future}, subject to regulatory approval",
        "{co} is listed on the {exchange} and has its headquarters in {city}",
        "{co} shares closed unchanged at {price} on {weekday}",
        "The {noun} will merge its {unit} and {unit2} units into a single division from {date}",
        "{co} will hold a conference call for analysts and investors on {weekday} at {hour}:00 CET",
        "{person} has been {co}'s {role} since {year}",
        "{co}'s {period_adj} results were in line with [analysts' expectations|market forecasts], with operating "
        "profit of {m}",
        "{co} reports its results in {currency_word} and its financial year ends in {month}",
        "{co} has not changed its outlook for {year}, which it published in {month}",
        "The share capital of {co} consists of {n_shares} million shares, each carrying one vote",
        "{co}'s main products are {product} and {product2}, sold mainly to customers in {region}",
        "The {noun}'s board proposed a dividend of {eps_lo} per share, the same as a year earlier",
        "{co} said it would comment on the matter when it publishes its results on {date}",
        "Operating profit of {co} was {m} in {period}, roughly the same level as in the previous quarter",
        "{co} has moved its {unit} operations to a new office in {city}",
        "{co} has completed the previously announced transfer of its {unit} unit to a separate subsidiary",
        "{co} will change its reporting segments from {next_year}, presenting {unit} and {unit2} separately",
        "The {noun} said {person} will present the strategy update at a capital markets day in {city} on {date}",
        "{co} did not comment on market speculation about a possible bid for {co2}",
        "{co}'s {period_adj} report was prepared under IFRS and has not been audited",
        "{co} issued {m} of [senior unsecured|fixed-rate|green] bonds maturing in {maturity}",
        "Trading in {co} shares will move to the {exchange} on {date}",
        "{co} sells its products in about {n_countries} countries through its own sales offices and distributors",
    ],
}
POSITIVE_DRIVERS = [", driven by strong demand for {product}", ", helped by cost savings", ", thanks to higher prices",
                    ", supported by recent acquisitions", " as volumes recovered in {country}"]
NEGATIVE_DRIVERS = [", hit by weak demand for {product}", ", due to higher raw material costs",
                    " as volumes fell in {country}", ", citing restructuring charges",
                    ", as customers in {region} cut orders"]
HEADWINDS = ["weaker demand in {region}", "higher energy costs", "a strong currency", "supply chain disruptions",
             "mild weather", "rising interest rates", "a strike at its {city} plant"]
# Attribution that leaves the tone alone; only added to sentences that do not already quote anyone.
ATTRIBUTIONS = [", the company said", ", the company said on {weekday}", ", according to a stock exchange release",
                ", it said in a statement", ", the {noun} said on {weekday}"]


def sentiment_slots(rng: random.Random, names: Names) -> dict:
    """Every value any sentiment template may use, drawn fresh for one row."""
    co, sector = rng.choice(names.companies)
    # rivals, bidders and partners come from the same sector where the pool has one
    peers = [name for name, other in names.companies if other == sector and name != co]
    co2 = rng.choice(peers or [name for name, _ in names.companies if name != co])
    spec = SECTORS[sector]
    currency = rng.choice(CURRENCIES)
    form = rng.choice(currency[1])
    low = rng.uniform(2, 900) if rng.random() < 0.85 else rng.uniform(900, 6000)
    high = low * rng.uniform(1.03, 1.5)
    eps_lo = rng.uniform(0.05, 3.0)
    margin_lo = rng.uniform(2, 15)
    year = rng.choice(YEARS)
    product, product2 = rng.sample(spec["products"], 2)
    unit, unit2 = rng.sample(spec["units"], 2)
    slots = {
        "co": co, "co2": co2, "noun": rng.choice(spec["nouns"]), "product": product, "product2": product2,
        "unit": unit, "unit2": unit2, "volume": spec["volume"], "contract": spec["contract"],
        "period_future": rng.choice(["the second half", "the fourth quarter", f"early {year + 1}",
                                     f"the first quarter of {year + 1}"]), "maturity": year + rng.randint(3, 10),
        "year": year, "next_year": year + 1, "month": rng.choice(MONTHS), "weekday": rng.choice(WEEKDAYS),
        "date": random_date(rng), "city": rng.choice(names.cities), "country": rng.choice(names.countries),
        "region": rng.choice(REGIONS), "person": rng.choice(names.persons), "role": rng.choice(ROLES),
        "broker": rng.choice(names.brokers), "exchange": rng.choice(EXCHANGES), "currency_word": currency[2],
        "m": format_amount(form, rng.uniform(2, 900)), "m_lo": format_amount(form, low),
        # before a noun ("a EUR 12.4 million contract") the amount must not read "12.4 million euros"
        "m_attr": format_amount(form if not form.startswith("{n}") else currency[0] + " {n} million",
                                rng.uniform(2, 900)),
        "m_hi": format_amount(form, high), "pct_up": format_pct(rng, (high / low - 1) * 100),
        "pct_down": format_pct(rng, (1 - low / high) * 100), "pct_small": format_pct(rng, rng.uniform(1.5, 9.5)),
        "pct_big": format_pct(rng, rng.uniform(10, 35)),
        "eps_lo": PER_SHARE_FORMS[currency[0]].format(n=f"{eps_lo:.2f}"),
        "eps_hi": PER_SHARE_FORMS[currency[0]].format(n=f"{eps_lo * rng.uniform(1.1, 1.6):.2f}"),
        "margin_lo": f"{margin_lo:.1f}%", "margin_hi": f"{margin_lo + rng.uniform(0.8, 4):.1f}%",
        "price": PER_SHARE_FORMS[currency[0]].format(n=f"{rng.uniform(2, 150):.2f}"),
        "n_jobs": rng.choice([40, 65, 120, 150, 180, 240, 300, 450, 600, 800, 1200, 2500]),
        "n_emp": f"{rng.randint(3, 400) * 50:,}", "n_countries": rng.randint(3, 40), "n_years": rng.randint(3, 12),
        "n_shares": f"{rng.uniform(20, 900):.1f}", "hour": rng.randint(9, 16),
    }
    slots["period"], slots["period_adj"] = random_period(rng)
    slots["headwind"] = rng.choice(HEADWINDS).format(**slots)
    slots["pos_driver"] = rng.choice(POSITIVE_DRIVERS).format(**slots) if rng.random() < 0.5 else ""
    slots["neg_driver"] = rng.choice(NEGATIVE_DRIVERS).format(**slots) if rng.random() < 0.5 else ""
    return slots


def make_sentiment_sentence(rng: random.Random, names: Names, label: str) -> str:
    """One news sentence of the given label, 10-40 words."""
    while True:
        slots = sentiment_slots(rng, names)
        template = rng.choice(SENTIMENT_TEMPLATES[label])
        if "{contract}" in template and slots["contract"] is None:
            continue
        sentence = expand_alternatives(rng, template).format(**slots)
        quotes_someone = any(word in sentence for word in (" said", " says", " warned", " expects", " citing"))
        if not quotes_someone and rng.random() < 0.35:
            sentence += rng.choice(ATTRIBUTIONS).format(**slots)
        sentence = fix_articles(fix_possessives(sentence[0].upper() + sentence[1:] + "."))
        if 10 <= len(sentence.split()) <= 40:
            return sentence


def make_sentiment_rows(rng: random.Random, names: Names, count: int, seen: set[str]) -> list[dict]:
    """`count` rows with labels as balanced as `count` allows, in shuffled order."""
    labels = [SENTIMENT_LABELS[i % 3] for i in range(count)]
    rng.shuffle(labels)
    rows = []
    for label in labels:
        while True:
            context = f"{SENTIMENT_INSTRUCTION}\nInput: {make_sentiment_sentence(rng, names, label)}\n{ANSWER_SUFFIX}"
            if context not in seen:
                break
        seen.add(context)
        rows.append({"context": context, "target": label})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Task 2: named-entity extraction
# ---------------------------------------------------------------------------------------------------------------

# Slots: ORG/ORG2/ORG3 and BROKER are organisations, PER/PER2 persons, CITY/CITY2/COUNTRY/PLACE/PLACE2 locations
# (PLACE: a city or a country). Lowercase slots are not entities; capitalised non-entities (months, weekdays,
# currency codes, EBIT) are there on purpose.
ENTITY_TEMPLATES = [
    # no entities
    "Net interest income [rose|increased] {pct} in {period}, while loan loss provisions remained low",
    "The board proposed a dividend of {eps} per share for {year}",
    "Operating profit for {period} was {m}, compared with {m2} a year earlier",
    "Analysts expect the company to report higher margins in the second half of {year}",
    "The group said demand for {product} weakened in {month} but recovered in {month2}",
    "Shares in the {noun} [fell|rose] {pct} in early trading on {weekday}",
    "The chief executive said on {weekday} that the company would focus on cost control and cash flow",
    "EBIT margin improved to {margin} in {period} as the {unit} unit returned to profit",
    "The company's order book stood at {m} at the end of {period}",
    # one entity
    "{ORG} said its {period_adj} operating profit [rose|fell] {pct} to {m}",
    "{ORG} shares [fell|dropped] {pct} on {weekday} after the company issued a profit warning",
    "{PER} has been appointed chief financial officer, effective {date}",
    "Retail sales in {COUNTRY} [grew|fell] {pct} in {month}, the statistics office said",
    "The company will move its headquarters to {CITY} by the end of {year}",
    "{BROKER} cut its price target on the stock, citing slower growth in {product}",
    "The {noun} said {PER} would leave the company at the end of {month} for personal reasons",
    "{ORG} [said|announced] it would cut costs by {m} over the next two years",
    "Inflation in {COUNTRY} slowed to {pct} in {month}, easing pressure on retailers' margins",
    "The {noun} opened a new office in {CITY} in {month}",
    "Chief executive {PER} said the company expects demand to recover in {period_future}",
    # two entities
    "{ORG} has [appointed|named] {PER} as its new {role}",
    "{ORG} will open a new distribution centre in {PLACE} next year",
    "{PER}, {role} of {ORG}, said demand for {product} remained strong in {period}",
    "{ORG} agreed to buy {ORG2} for {m} in cash",
    "Analysts at {BROKER} raised their price target on {ORG} to {price}",
    "{PER} told reporters in {CITY} that the company had no plans to raise new equity",
    "{ORG}'s plant in {CITY} will close in {period_future}, affecting about {n} jobs",
    "{CITY}-based {ORG} reported a {pct} rise in {period_adj} revenue",
    "Revenue from {COUNTRY} accounted for {pct} of sales at {ORG} last year",
    "{PER} joined {ORG} from a rival in {month}",
    "{ORG} [completed|finalised] the sale of its [plant|factory] in {CITY}",
    "Chief executive {PER} said orders in {PLACE} grew faster than expected",
    # three entities
    "{PER}, {role} of {ORG}, told reporters in {CITY} that margins would improve",
    "{ORG} agreed to sell its {CITY} unit to {ORG2} for {m}",
    "{ORG} has hired {PER} from {ORG2} to lead its {unit} business",
    "{ORG} and {ORG2} will build a joint {product} plant in {PLACE}",
    "Speaking in {CITY} on {weekday}, {PER} said {ORG} would keep its dividend unchanged",
    "{PER} will step down as chair of {ORG} and will be succeeded by {PER2}",
    "{ORG} opened offices in {PLACE} and {PLACE2} during {period}",
    "{BROKER} upgraded {ORG} to buy, saying the {noun} is gaining market share in {COUNTRY}",
    "{ORG} [named|appointed] {PER} to head its operations in {PLACE}",
    "Shares in {ORG} rose {pct} after {BROKER} raised its rating on the stock, citing growth in {PLACE}",
    # four entities
    "{PER} will succeed {PER2} as {role} of {ORG} after the annual general meeting in {CITY}",
    "{ORG} agreed to buy {CITY}-based {ORG2} from {ORG3} for {m}",
    "{PER} of {BROKER} said the takeover of {ORG} would strengthen the buyer's position in {COUNTRY}",
    "{ORG} is moving production from {CITY} to {CITY2}, {role} {PER} said on {weekday}",
    "Analysts at {BROKER} said {ORG} could expand in {PLACE} and {PLACE2} after the deal",
    "{PER} and {PER2} joined the board of {ORG}, the {noun} said in a statement from {CITY}",
    "{ORG} and {ORG2} agreed to merge, creating a {noun} with headquarters in {CITY} and operations in {PLACE}",
    "{PER}, who ran {ORG}'s business in {PLACE}, will join {ORG2} next year",
]
# Share of rows with 0, 1, 2, 3 and 4 entities.
ENTITY_COUNT_WEIGHTS = [0.12, 0.22, 0.28, 0.24, 0.14]
ENTITY_TYPES = {"ORG": "ORG", "ORG2": "ORG", "ORG3": "ORG", "BROKER": "ORG", "PER": "PER", "PER2": "PER",
                "CITY": "LOC", "CITY2": "LOC", "COUNTRY": "LOC", "PLACE": "LOC", "PLACE2": "LOC"}


def entity_slot_count(template: str) -> int:
    """How many entity slots a template has."""
    return sum("{" + slot + "}" in template for slot in ENTITY_TYPES)


TEMPLATES_BY_ENTITY_COUNT = [[t for t in ENTITY_TEMPLATES if entity_slot_count(t) == count]
                             for count in range(len(ENTITY_COUNT_WEIGHTS))]


def entity_slots(rng: random.Random, names: Names) -> dict:
    """Slot values for one entity row; ENTITY_TYPES says which slots are entities."""
    (org, sector), (org2, _), (org3, _) = rng.sample(names.companies, 3)
    spec = SECTORS[sector]
    code, forms, _ = rng.choice(CURRENCIES)
    form = rng.choice(forms)
    per, per2 = rng.sample(names.persons, 2)
    city, city2 = rng.sample(names.cities, 2)
    place, place2 = rng.sample(names.cities + names.countries, 2)
    month, month2 = rng.sample(MONTHS, 2)
    period = random_period(rng)
    return {
        "ORG": org, "ORG2": org2, "ORG3": org3, "BROKER": rng.choice(names.brokers), "PER": per, "PER2": per2,
        "CITY": city, "CITY2": city2, "COUNTRY": rng.choice(names.countries), "PLACE": place, "PLACE2": place2,
        "pct": format_pct(rng, rng.uniform(1, 30)), "period": period.noun, "period_adj": period.adj,
        "period_future": rng.choice(["the second half", "the fourth quarter", "early 2026", "the spring"]),
        "m": format_amount(form, rng.uniform(5, 3000)), "m2": format_amount(form, rng.uniform(5, 3000)),
        "eps": PER_SHARE_FORMS[code].format(n=f"{rng.uniform(0.1, 3):.2f}"),
        "price": PER_SHARE_FORMS[code].format(n=f"{rng.uniform(5, 120):.2f}"), "margin": f"{rng.uniform(3, 18):.1f}%",
        "year": rng.choice(YEARS), "month": month, "month2": month2, "weekday": rng.choice(WEEKDAYS),
        "date": random_date(rng), "product": rng.choice(spec["products"]), "unit": rng.choice(spec["units"]),
        "noun": rng.choice(spec["nouns"]), "role": rng.choice(ROLES), "n": rng.choice([80, 150, 300, 420, 900]),
    }


def make_entity_example(rng: random.Random, names: Names) -> tuple[str, str]:
    """(sentence, target) with the target listing entities in order of appearance."""
    while True:
        slots = entity_slots(rng, names)
        count = rng.choices(range(len(ENTITY_COUNT_WEIGHTS)), weights=ENTITY_COUNT_WEIGHTS)[0]
        template = rng.choice(TEMPLATES_BY_ENTITY_COUNT[count])
        sentence = expand_alternatives(rng, template).format(**slots)
        sentence = fix_articles(fix_possessives(sentence[0].upper() + sentence[1:] + "."))
        used = [slot for slot in ENTITY_TYPES if "{" + slot + "}" in template]
        surfaces = [slots[slot] for slot in used]
        # The target is only well defined when each entity occurs once and none hides inside another.
        if any(sentence.count(surface) != 1 for surface in surfaces):
            continue
        if any(a != b and a in b for a in surfaces for b in surfaces):
            continue
        ordered = sorted(used, key=lambda slot: sentence.index(slots[slot]))
        target = "; ".join(f"{slots[slot]}, {ENTITY_TYPES[slot]}" for slot in ordered) or "none"
        return sentence, target


def make_entity_rows(rng: random.Random, names: Names, count: int, seen: set[str]) -> list[dict]:
    """`count` rows whose contexts are not in `seen` (which grows with them)."""
    rows = []
    while len(rows) < count:
        sentence, target = make_entity_example(rng, names)
        context = f"{ENTITY_INSTRUCTION}\nInput: {sentence}\n{ANSWER_SUFFIX}"
        if context in seen:
            continue
        seen.add(context)
        rows.append({"context": context, "target": target})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Task 3: numeric questions on statement snippets
# ---------------------------------------------------------------------------------------------------------------


def random_millions(rng: random.Random, low: float, high: float) -> Decimal:
    """An amount in millions with one decimal, exact as a Decimal."""
    return Decimal(rng.randint(int(low * 10), int(high * 10))) / 10


def round_answer(value: Decimal, decimals: int) -> str:
    """The answer as a plain decimal string, rounded half up, never '-0.00'."""
    rounded = value.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    return str(rounded.copy_abs() if rounded.is_zero() else rounded)


class Money:
    """How one snippet writes amounts: a currency, one of its written forms, and its plural word."""

    def __init__(self, rng: random.Random):
        code, forms, word = rng.choice(CURRENCIES)
        self.code, self.word = code, word
        self.form = rng.choice([f for f in forms if "mn" not in f])

    def millions(self, value: Decimal) -> str:
        return self.form.format(n=f"{value:,.1f}")

    def per_share(self, value: Decimal) -> str:
        return PER_SHARE_FORMS[self.code].format(n=f"{value:.2f}")


# Each builder takes (rng, company name, Period, Money, two business units of the company's sector) and returns
# (snippet, question, exact answer as a Decimal, decimals the answer is rounded to).


def calc_gross_margin(rng, co, period, money, units):
    """Gross margin in percent, or gross profit in millions."""
    revenue = random_millions(rng, 80, 9000)
    cost = (revenue * Decimal(rng.randint(35, 82)) / 100).quantize(Decimal("0.1"))
    snippet = rng.choice([
        f"{co} reported {period.adj} revenue of {money.millions(revenue)} and cost of goods sold of "
        f"{money.millions(cost)}.",
        f"In {period.noun}, net sales at {co} were {money.millions(revenue)}, while cost of sales amounted to "
        f"{money.millions(cost)}.",
    ])
    if rng.random() < 0.5:
        snippet += f" Operating expenses were {money.millions(random_millions(rng, 5, float(revenue - cost)))}."
    if rng.random() < 0.5:
        return snippet, "What was gross profit, in millions of " + money.word + "?", revenue - cost, 1
    return snippet, "What was the gross margin, in percent?", (revenue - cost) / revenue * 100, rng.choice([1, 2])


def calc_operating_margin(rng, co, period, money, units):
    """Operating margin in percent (negative for an operating loss)."""
    revenue = random_millions(rng, 50, 12000)
    profit = (revenue * Decimal(rng.choice([rng.randint(-60, -5), rng.randint(5, 280)])) / 1000).quantize(
        Decimal("0.1"))
    word = "profit" if profit >= 0 else "loss"
    snippet = f"{co} posted {period.adj} revenue of {money.millions(revenue)} and an operating {word} of " \
              f"{money.millions(abs(profit))}."
    if rng.random() < 0.4:
        snippet += f" Net financial items were {money.millions(random_millions(rng, 1, 40))}."
    return snippet, "What was the operating margin, in percent?", profit / revenue * 100, rng.choice([1, 2])


def calc_growth(rng, co, period, money, units):
    """Year-on-year change of a figure in percent."""
    year = rng.choice(YEARS)
    before = random_millions(rng, 40, 8000)
    after = (before * Decimal(rng.choice([rng.randint(700, 990), rng.randint(1010, 1450)])) / 1000).quantize(
        Decimal("0.1"))
    metric = rng.choice(["revenue", "net sales", "operating profit", "order intake"])
    verb = "rose" if after > before else "fell"
    snippet = f"{co}'s {metric} {verb} to {money.millions(after)} in {year} from {money.millions(before)} in " \
              f"{year - 1}."
    if rng.random() < 0.4:
        snippet += f" It employed {rng.randint(200, 9000):,} people at the end of {year}."
    question = rng.choice([f"What was the year-on-year change in {metric}, in percent?",
                           f"By what percentage did {metric} change from {year - 1} to {year}?"])
    return snippet, question, (after - before) / before * 100, rng.choice([1, 2])


def calc_eps(rng, co, period, money, units):
    """Basic earnings per share from net profit and the share count."""
    net_income = random_millions(rng, 3, 2500)
    shares = random_millions(rng, 15, 1200)
    snippet = f"{co} made a net profit of {money.millions(net_income)} in {period.noun}. The average number of " \
              f"shares outstanding was {shares:,.1f} million."
    if rng.random() < 0.5:
        snippet += f" Revenue for the period was {money.millions(net_income * rng.randint(6, 25))}."
    question = f"What were basic earnings per share, in {money.word}?"
    return snippet, question, net_income / shares, 2


def calc_current_ratio(rng, co, period, money, units):
    """Current assets divided by current liabilities."""
    assets = random_millions(rng, 50, 6000)
    liabilities = (assets * Decimal(rng.randint(40, 130)) / 100).quantize(Decimal("0.1"))
    snippet = f"At the end of {period.noun}, {co} had current assets of {money.millions(assets)} and current " \
              f"liabilities of {money.millions(liabilities)}."
    if rng.random() < 0.5:
        snippet += f" Total equity stood at {money.millions(random_millions(rng, 100, 9000))}."
    return snippet, "What was the current ratio?", assets / liabilities, 2


def calc_debt_to_equity(rng, co, period, money, units):
    """Debt-to-equity ratio, or net debt in millions."""
    equity = random_millions(rng, 100, 9000)
    debt = (equity * Decimal(rng.randint(10, 250)) / 100).quantize(Decimal("0.1"))
    cash = random_millions(rng, 5, float(debt))
    snippet = f"{co}'s balance sheet showed interest-bearing debt of {money.millions(debt)}, cash of " \
              f"{money.millions(cash)} and shareholders' equity of {money.millions(equity)}."
    if rng.random() < 0.5:
        return snippet, "What was net debt, in millions of " + money.word + "?", debt - cash, 1
    return snippet, "What was the debt-to-equity ratio (debt divided by equity)?", debt / equity, 2


def calc_profit_change(rng, co, period, money, units):
    """Change in operating profit in millions."""
    before = random_millions(rng, 5, 1500)
    after = (before * Decimal(rng.choice([rng.randint(600, 990), rng.randint(1010, 1500)])) / 1000).quantize(
        Decimal("0.1"))
    direction = "increased" if after > before else "decreased"
    snippet = f"Operating profit at {co} {direction} to {money.millions(after)} in {period.noun} from " \
              f"{money.millions(before)} a year earlier."
    if rng.random() < 0.4:
        snippet += f" Revenue was {money.millions(after * rng.randint(8, 20))}."
    question = f"By how many millions of {money.word} did operating profit change? Give a decrease as a negative " \
               "number."
    return snippet, question, after - before, 1


def calc_segment_share(rng, co, period, money, units):
    """One division's share of revenue in percent (the third division is left unnamed)."""
    part_a, part_b, part_c = (random_millions(rng, 20, 3000) for _ in range(3))
    total = part_a + part_b + part_c
    unit_a, unit_b = units
    snippet = f"{co}'s {period.adj} revenue of {money.millions(total)} included {money.millions(part_a)} from the " \
              f"{unit_a} division and {money.millions(part_b)} from the {unit_b} division."
    return snippet, f"What share of revenue came from the {unit_a} division, in percent?", part_a / total * 100, \
        rng.choice([0, 1])


def calc_payout_ratio(rng, co, period, money, units):
    """Dividend per share over earnings per share, in percent."""
    eps = Decimal(rng.randint(20, 900)) / 100
    dps = (eps * Decimal(rng.randint(20, 95)) / 100).quantize(Decimal("0.01"))
    snippet = f"{co} reported earnings per share of {money.per_share(eps)} for {rng.choice(YEARS)}, and the " \
              f"board proposed a dividend of {money.per_share(dps)} per share."
    return snippet, "What was the dividend payout ratio, in percent?", dps / eps * 100, rng.choice([0, 1])


def calc_pe_ratio(rng, co, period, money, units):
    """Share price over earnings per share."""
    eps = Decimal(rng.randint(10, 800)) / 100
    price = (eps * Decimal(rng.randint(50, 400)) / 10).quantize(Decimal("0.01"))
    snippet = f"{co}'s shares closed at {money.per_share(price)} on {random_date(rng)}. Earnings per share over " \
              f"the last twelve months were {money.per_share(eps)}."
    return snippet, "What was the price-to-earnings ratio?", price / eps, 1


def calc_interest_cover(rng, co, period, money, units):
    """Operating profit over net interest."""
    ebit = random_millions(rng, 10, 3000)
    interest = (ebit / Decimal(rng.randint(15, 200)) * 10).quantize(Decimal("0.1"))
    snippet = f"In {period.noun}, {co} earned an operating profit of {money.millions(ebit)} and paid net interest of " \
              f"{money.millions(interest)}."
    if rng.random() < 0.5:
        return snippet, "How many times did operating profit cover interest expense?", ebit / interest, 1
    snippet += f" Depreciation and amortisation totalled {money.millions(random_millions(rng, 2, float(ebit)))}."
    return snippet, "What was the interest coverage ratio (operating profit divided by net interest)?", \
        ebit / interest, 2


def calc_ebitda(rng, co, period, money, units):
    """Operating profit plus depreciation and amortisation, in millions."""
    ebit = random_millions(rng, 5, 2500)
    depreciation = random_millions(rng, 2, 800)
    snippet = f"{co}'s operating profit (EBIT) for {period.noun} was {money.millions(ebit)}, after depreciation and " \
              f"amortisation of {money.millions(depreciation)}."
    return snippet, f"What was EBITDA, in millions of {money.word}?", ebit + depreciation, 1


COST_OF_SALES_BUILDERS = (calc_gross_margin,)
CALC_BUILDERS = [calc_gross_margin, calc_operating_margin, calc_growth, calc_eps, calc_current_ratio,
                 calc_debt_to_equity, calc_profit_change, calc_segment_share, calc_payout_ratio, calc_pe_ratio,
                 calc_interest_cover, calc_ebitda]


def make_calc_rows(rng: random.Random, names: Names, count: int, seen: set[str]) -> list[dict]:
    """`count` rows, cycling through the question kinds so each appears about equally often."""
    kinds = [CALC_BUILDERS[i % len(CALC_BUILDERS)] for i in range(count)]
    rng.shuffle(kinds)
    rows = []
    for build in kinds:
        while True:
            co, sector = rng.choice(names.companies)
            if build in COST_OF_SALES_BUILDERS and sector in ("bank", "insurance"):
                continue  # banks and insurers report no cost of goods sold
            units = rng.sample(SECTORS[sector]["units"], 2)
            snippet, question, value, decimals = build(rng, co, random_period(rng), Money(rng), units)
            snippet = fix_articles(fix_possessives(snippet))
            context = f"{CALC_INSTRUCTION} {ROUNDING_RULES[decimals]}\nInput: {snippet} Question: {question}\n" \
                      f"{ANSWER_SUFFIX}"
            if context not in seen:
                break
        seen.add(context)
        rows.append({"context": context, "target": round_answer(value, decimals)})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Arithmetic (a verifiable task of tunable difficulty, for reinforcement learning)
# ---------------------------------------------------------------------------------------------------------------

ARITH_INSTRUCTION = "Instruction: Answer with a number only."
# The difficulty knob: operands are whole dollar amounts from 2 to this value. data/README.md ("Arith") gives the
# sampled accuracy of the warm-started SmolLM2-135M-Instruct per value; bench/rl_gain.py calibrate measures it.
ARITH_MAX_OPERAND = 9
# The warm start (a short SFT recipe) teaches the answer format on one-digit operands (its own 200 problems).
ARITH_FORMAT_MAX_OPERAND = 9
ARITH_TRAIN_ROWS = 1000
ARITH_FORMAT_ROWS = 200
ARITH_TEST_ROWS = 300
ARITH_PERCENTS = (10, 20, 25, 50)


def arith_sum(rng: random.Random, co: str, top: int) -> tuple[str, int]:
    a, b = rng.randint(2, top), rng.randint(2, top)
    text = rng.choice(["{co} had ${a} in cash and received ${b}. How many dollars does it have now?",
                       "{co} sold goods for ${a} on Monday and ${b} on Tuesday. What were total sales in dollars?"])
    return text.format(co=co, a=a, b=b), a + b


def arith_difference(rng: random.Random, co: str, top: int) -> tuple[str, int]:
    a, b = sorted(rng.sample(range(2, top + 1), 2), reverse=True)
    text = rng.choice(["{co} earned ${a} and spent ${b}. What was the profit in dollars?",
                       "{co} had ${a} in cash and paid a bill of ${b}. How many dollars are left?"])
    return text.format(co=co, a=a, b=b), a - b


def arith_percent(rng: random.Random, co: str, top: int) -> tuple[str, int]:
    percent = rng.choice(ARITH_PERCENTS)
    step = 100 // math.gcd(percent, 100)  # the smallest amount of which percent% is a whole number
    amount = step * rng.randint(1, max(1, top // step))
    text = rng.choice(["{co} pays {p}% tax on a profit of ${n}. How many dollars of tax does it pay?",
                       "{co} gives a {p}% discount on an item costing ${n}. How many dollars is the discount?"])
    return text.format(co=co, p=percent, n=amount), amount * percent // 100


ARITH_BUILDERS = [arith_sum, arith_difference, arith_percent]


def make_arith_rows(rng: random.Random, names: Names, count: int, seen: set[str],
                    max_operand: int = ARITH_MAX_OPERAND) -> list[dict]:
    """`count` one-step problems on whole dollar amounts from 2 to `max_operand` (sums, differences, and 10/20/25/50
    percent of an amount), the kinds equally often; every answer is a whole number."""
    kinds = [ARITH_BUILDERS[i % len(ARITH_BUILDERS)] for i in range(count)]
    rng.shuffle(kinds)
    rows = []
    for build in kinds:
        while True:
            question, answer = build(rng, rng.choice(names.companies)[0].split()[0], max_operand)
            context = f"{ARITH_INSTRUCTION}\nInput: {question}\n{ANSWER_SUFFIX}"
            if context not in seen:
                break
        seen.add(context)
        rows.append({"context": context, "target": str(answer)})
    return rows


def build_arith(full: Names, train_names: Names) -> dict[str, list[dict]]:
    """The arithmetic files: RL training prompts, the warm start's format lesson, and the fixed held-out test."""
    seen: set[str] = set()  # shared by all three, so no context lands in two of them
    offset = len(TASKS)
    return {
        "test/arith_test.jsonl": make_arith_rows(random.Random(SEED + 10 * offset + 3), full, ARITH_TEST_ROWS, seen),
        "train/arith_train.jsonl": make_arith_rows(random.Random(SEED + 10 * offset + 2), train_names,
                                                   ARITH_TRAIN_ROWS, seen),
        "train/arith_format_train.jsonl": make_arith_rows(random.Random(SEED + 10 * offset + 4), train_names,
                                                          ARITH_FORMAT_ROWS, seen, ARITH_FORMAT_MAX_OPERAND),
    }


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------

TASKS = {"sentiment": make_sentiment_rows, "entities": make_entity_rows, "calc": make_calc_rows}
REJECTED_ENTITY_TYPES = ["ORG", "PER", "LOC"]


def rejected_answer(task: str, target: str, context: str, rng: random.Random) -> str | None:
    """A plausible wrong answer: another label, one entity's type swapped, or a near-miss number (5-20% off, the
    same decimals: far outside the 1% tolerance the calc task scores with). None when the row has none."""
    if task == "sentiment":
        return rng.choice([label for label in SENTIMENT_LABELS if label != target])
    if task == "entities":
        if target == "none":
            words = re.findall(r"\b[A-Z][a-z]{3,}\b", context.split("Input: ", 1)[1])
            return f"{words[-1]}, {rng.choice(REJECTED_ENTITY_TYPES)}" if words else None
        pairs = [pair.rsplit(", ", 1) for pair in target.split("; ")]
        index = rng.randrange(len(pairs))
        pairs[index][1] = rng.choice([kind for kind in REJECTED_ENTITY_TYPES if kind != pairs[index][1]])
        return "; ".join(f"{name}, {kind}" for name, kind in pairs)
    decimals = len(target.split(".", 1)[1]) if "." in target else 0
    factor = Decimal(1) + Decimal(rng.choice([-1, 1])) * Decimal(rng.randint(5, 20)) / Decimal(100)
    wrong = round_answer(Decimal(target) * factor, decimals)
    return wrong if wrong != target else None


def preference_rows(task: str, rows: list[dict], rng: random.Random) -> list[dict]:
    """Preference pairs from a task's rows: FinLoRA's context as the prompt, the right answer chosen."""
    pairs = []
    for row in rows:
        rejected = rejected_answer(task, row["target"], row["context"], rng)
        if rejected is not None:
            pairs.append({"context": row["context"], "chosen": row["target"], "rejected": rejected})
    return pairs


def build_all() -> dict[str, list[dict]]:
    """Every file's rows, keyed by its path relative to the output folder."""
    full = build_full_names()
    train_names = train_subset(full)
    files = {}
    for offset, (task, make_rows) in enumerate(TASKS.items()):
        seen: set[str] = set()  # shared by train and test, so no context lands in both
        files[f"train/{task}_train.jsonl"] = make_rows(random.Random(SEED + 10 * offset + 2), train_names,
                                                       TRAIN_ROWS, seen)
        files[f"test/{task}_test.jsonl"] = make_rows(random.Random(SEED + 10 * offset + 3), full, TEST_ROWS, seen)
    for offset, task in enumerate(TASKS):
        # Preference pairs (dpo recipes): train pairs from the train rows, held-out pairs from the test rows.
        for split in ("train", "test"):
            rng = random.Random(SEED + 10 * offset + (5 if split == "train" else 6))
            files[f"preference/{task}_{split}.jsonl"] = preference_rows(task, files[f"{split}/{task}_{split}.jsonl"],
                                                                       rng)
    # The sentiment train rows as chat rows (a chat-format recipe on the same data as the plain one).
    files["chat/sentiment_train.jsonl"] = [{"messages": [{"role": "user", "content": row["context"]},
                                                         {"role": "assistant", "content": row["target"]}]}
                                           for row in files["train/sentiment_train.jsonl"]]
    files.update(build_arith(full, train_names))
    return files


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, '\\n' line ends on every platform."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder that receives train/ and test/ (default: the data/ folder of this script)")
    args = parser.parse_args()
    for relative, rows in build_all().items():
        write_jsonl(args.out / relative, rows)
        detail = ""
        if "sentiment" in relative and relative.startswith(("train/", "test/")):
            detail = " (" + ", ".join(f"{label} {sum(r['target'] == label for r in rows)}"
                                      for label in SENTIMENT_LABELS) + ")"
        print(f"wrote {args.out / relative}: {len(rows)} rows{detail}")


if __name__ == "__main__":
    main()
