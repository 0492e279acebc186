spring-hello = Весна прийшла, { $first_name }! Бажаєте код на весняну колекцію?
spring-btn-yes = Так, будь ласка
spring-btn-no = Не зараз
spring-code = Ваш код: SPRING15 (знижка 15% до кінця травня).
spring-bye = Гаразд. Ми повідомимо вас про новини.
