"""Chat answers for the judges: batched greedy answers equal one-by-one ``generate``, in order,
whatever the mix of temperatures; answers stop within the model's context."""

from test_margins import greedy_one_by_one

from sapo.builtin.tiny import tiny_llama
from sapo.evaluation.answers import answer_conversations, chat_prompt_ids


def greedy_answer(model, tokenizer, conversation, max_new_tokens):
    answer = greedy_one_by_one(model, chat_prompt_ids(tokenizer, conversation), max_new_tokens, tokenizer)
    return tokenizer.decode(answer, skip_special_tokens=True).strip()


def user(text):
    return [{"role": "user", "content": text}]


def test_greedy_answers_are_generates_one_by_one_in_order(tokenizer):
    model = tiny_llama(tokenizer, seed=2).eval()
    conversations = [
        user("12*11="),
        user("a much longer question, padded on the left in its batch"),
        user("3+4=") + [{"role": "assistant", "content": "7"}] + user("and 5+6="),
        user("x"),
        user("hello"),
    ]
    expected = [greedy_answer(model, tokenizer, conversation, 6) for conversation in conversations]
    answers = answer_conversations(model, tokenizer, conversations, [0.0] * 5, max_new_tokens=6, batch_size=2)
    assert answers == expected


def test_sampled_rows_leave_the_greedy_ones_and_the_order_unchanged(tokenizer):
    model = tiny_llama(tokenizer, seed=2).eval()
    conversations = [user(f"{i}*{i}=") for i in range(6)]
    temperatures = [0.0, 0.7, 0.0, 0.1, 0.7, 0.0]
    mixed = answer_conversations(
        model, tokenizer, conversations, temperatures, max_new_tokens=5, batch_size=4
    )
    greedy = answer_conversations(model, tokenizer, conversations, [0.0] * 6, max_new_tokens=5, batch_size=4)
    assert [mixed[i] for i in (0, 2, 5)] == [greedy[i] for i in (0, 2, 5)]
    again = answer_conversations(
        model, tokenizer, conversations, temperatures, max_new_tokens=5, batch_size=4
    )
    assert again == mixed  # seeded


def test_answers_stop_at_the_models_context(tokenizer):
    model = tiny_llama(tokenizer, seed=2, max_position_embeddings=24).eval()
    conversations = [user("1+1="), user("a question longer than the whole context of the model")]
    short, none = answer_conversations(model, tokenizer, conversations, [0.0, 0.0], max_new_tokens=100)
    assert len(tokenizer(short, add_special_tokens=False)["input_ids"]) <= 24 - len(
        chat_prompt_ids(tokenizer, conversations[0])
    )
    assert none == ""
    assert model.training is False
