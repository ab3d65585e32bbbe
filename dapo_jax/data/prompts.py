"""The DAPO prompt template, verbatim from the DAPO-Math-17k and AIME parquet files."""

DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    "Remember to put your answer on its own line after \"Answer:\".")


def dapo_prompt(problem: str) -> str:
  return DAPO_TEMPLATE.format(problem=problem)
