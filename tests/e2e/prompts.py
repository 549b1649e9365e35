"""Fixed chat prompts for the end-to-end tests: mixed kinds (writing, QA, maths, code,
translation, summarisation, extraction, role-play) and lengths (a few words to a paragraph)."""

SHORT_PASSAGE = (
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin spans "
    "seven million square kilometres, of which five and a half million are covered by the "
    "rainforest. The region includes territory belonging to nine nations. The majority of the "
    "forest is contained within Brazil, with 60% of the rainforest, followed by Peru with 13%, "
    "Colombia with 10%, and with minor amounts in Bolivia, Ecuador, French Guiana, Guyana, "
    "Suriname, and Venezuela. The rainforest likely formed during the Eocene era and has been "
    "home to humans for at least 11,000 years."
)

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers greater than 10.",
    "Translate to French: 'The weather is nice today and we are going to the park.'",
    "Translate to German: 'Where is the train station?'",
    f"Summarize the following text in one sentence.\n\n{SHORT_PASSAGE}",
    f"Which country holds most of the Amazon rainforest? Answer using the text.\n\n{SHORT_PASSAGE}",
    "Write a Python function that returns the factorial of n.",
    "Write a haiku about autumn leaves.",
    "If a train travels 60 miles per hour for 3 hours, how far does it go? Show your steps.",
    "What is 17 multiplied by 23?",
    "Give me three tips for staying focused while studying.",
    "Who wrote 'Romeo and Juliet'?",
    "Describe the water cycle to a ten-year-old.",
    "Pretend you are a pirate and greet me.",
    "What are the main differences between a cat and a dog as pets?",
    "Extract the numbers from this sentence: 'In 2020, 45 students and 3 teachers visited 12 museums.'",
    "Write an email to a colleague asking to reschedule a meeting to Friday.",
    "Why is the sky blue?",
    "Name five fruits that are red.",
    "Tell me a short story about a robot who learns to paint.",
    "What is the boiling point of water in Fahrenheit?",
    "Write a SQL query that counts the rows of a table named users.",
]

HIGH_ENTROPY_PROMPT = "Say one random word."
